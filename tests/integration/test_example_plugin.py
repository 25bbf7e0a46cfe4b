"""The example third-party backend (tests/example_plugin, its own package, installed by the
setup script and found through its entry point) passes the plugin conformance kit."""

import pytest

from supervisor.backends import available_backends
from supervisor.testing.conformance import BackendConformance

pytest.importorskip("example_backend", reason="install it: pip install -e tests/example_plugin")


def test_the_example_is_discovered_through_its_entry_point() -> None:
    assert available_backends()["example"].__module__ == "example_backend"


class TestExampleBackendConformance(BackendConformance):
    backend_name = "example"
    sim_dialect = "vllm"  # exampled speaks vLLM's shapes, so the vllm simulator stands in
