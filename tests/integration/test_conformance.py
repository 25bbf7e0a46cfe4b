"""Every first-party backend passes the conformance kit against its simulated dialect."""

from supervisor.testing.conformance import BackendConformance


class TestVllmConformance(BackendConformance):
    backend_name = "vllm"


class TestSglangConformance(BackendConformance):
    backend_name = "sglang"


class TestTrtllmConformance(BackendConformance):
    backend_name = "trtllm"


class TestVllmGmsConformance(BackendConformance):
    """Dynamo's vLLM worker with GPU Memory Service: /engine/sleep, /engine/wake_up."""

    backend_name = "vllm-gms"


class TestSglangGmsConformance(BackendConformance):
    """Dynamo's SGLang worker with GPU Memory Service: /engine/*_memory_occupation."""

    backend_name = "sglang-gms"
