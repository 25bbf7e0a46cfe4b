"""The supervisor's conformance kit against the real tinyserve program (on the PATH once
this package is installed)."""

from supervisor.testing.conformance import BackendConformance


class TestTinyserveConformance(BackendConformance):
    backend_name = "tinyserve"
    real_engine = True
    model = "tiny-words"
    load_timeout = 20.0
