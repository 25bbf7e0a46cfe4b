"""Every first-party backend passes the conformance kit against its simulated dialect."""

from supervisor.testing.conformance import BackendConformance


class TestVllmConformance(BackendConformance):
    backend_name = "vllm"


class TestSglangConformance(BackendConformance):
    backend_name = "sglang"


class TestTrtllmConformance(BackendConformance):
    backend_name = "trtllm"
