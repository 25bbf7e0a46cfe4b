"""NVML readings against a real NVIDIA driver (no fault is injected on the real device).

Run on a GPU machine: ``pip install 'failover-supervisor[gpu]'`` then
``pytest -m gpu tests/gpu``. Skipped where nvidia-ml-py or a driver is missing.
"""

from __future__ import annotations

import re

import anyio
import pytest
from prometheus_client import generate_latest

from supervisor.gpu import THROTTLE_REASONS, GpuWatcher, NvmlReader, NvmlUnavailable
from supervisor.metrics import Metrics

pytestmark = pytest.mark.gpu
pytest.importorskip("pynvml", reason="needs nvidia-ml-py: pip install 'failover-supervisor[gpu]'")


@pytest.fixture
def reader() -> NvmlReader:
    try:
        return NvmlReader()
    except NvmlUnavailable as e:
        pytest.skip(f"no NVIDIA driver here: {e}")


def test_readings_from_the_real_driver(reader: NvmlReader) -> None:
    readings = reader.read()
    assert readings, "the driver lists no GPU"
    for r in readings:
        print(
            f"GPU {r.gpu} {r.name} pci={r.pci} used={r.memory_used / 2**30:.2f} GiB "
            f"total={r.memory_total / 2**30:.2f} GiB ecc_uncorrected={r.ecc_uncorrected} "
            f"pages_pending={r.pages_pending} throttle={r.throttle_reasons} lost={r.lost}"
        )
        assert re.fullmatch(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}", r.pci)
        assert r.name and r.memory_total > 2**30 and 0 <= r.memory_used <= r.memory_total
        assert set(r.throttle_reasons) <= set(THROTTLE_REASONS.values())
        assert not r.lost

    metrics = Metrics()

    async def on_fatal(gpu: str, reason: str, at: float) -> None:
        raise AssertionError(f"a healthy GPU was called broken: {reason}")

    watcher = GpuWatcher(metrics, on_fatal)

    async def apply_all() -> None:
        for r in readings:
            await watcher._apply(r)

    anyio.run(apply_all)
    text = generate_latest(metrics.registry).decode()
    assert f'failover_supervisor_gpu_healthy{{gpu="{readings[0].gpu}"}} 1.0' in text
    assert watcher.gpu_of(readings[0].pci) == readings[0].gpu  # XIDs can now be mapped


def test_memory_reading_follows_a_real_allocation(reader: NvmlReader) -> None:
    torch = pytest.importorskip("torch", reason="needs torch to allocate GPU memory")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    before = reader.read()[0].memory_used
    block = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    after = reader.read()[0].memory_used
    print(f"GPU 0 memory used: {before / 2**30:.2f} -> {after / 2**30:.2f} GiB after 2 GiB")
    assert after - before >= 1.9 * 2**30
    del block
