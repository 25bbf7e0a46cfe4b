"""The cuda-checkpoint suspend strategy on a real GPU: memory freed, then restored intact.

Needs an NVIDIA GPU with driver >= 570, torch with CUDA, nvidia-ml-py, root (ptrace), and
the cuda-checkpoint binary ($CUDA_CHECKPOINT_BIN or PATH) for the binary variant.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch", reason="needs torch with CUDA")
pynvml = pytest.importorskip("pynvml", reason="needs nvidia-ml-py")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from plugins.cuda_checkpoint import (  # noqa: E402
    ApiDriver,
    BinaryDriver,
    CheckpointError,
    CudaCheckpointStrategy,
    cuda_processes,
)

ENGINE = Path(__file__).with_name("torch_engine.py")


def gpu_memory_of(pids: list[int]) -> int:
    """Device memory NVML attributes to ``pids`` on GPU 0."""
    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    return sum(
        p.usedGpuMemory or 0
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)
        if p.pid in pids
    )


def driver(kind: str) -> object:
    if kind == "binary":
        path = os.environ.get("CUDA_CHECKPOINT_BIN")
        if not path:
            pytest.skip("set CUDA_CHECKPOINT_BIN to the cuda-checkpoint binary")
        return BinaryDriver(path)
    try:
        return ApiDriver()
    except CheckpointError as e:
        pytest.skip(str(e))


def ask(proc: subprocess.Popen[str], line: str) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


@pytest.mark.parametrize("kind", ["binary", "driver-api"])
@pytest.mark.parametrize("tree", [False, True], ids=["one-process", "two-process-tree"])
def test_suspend_frees_gpu_memory_and_resume_restores_it(kind: str, tree: bool) -> None:
    strategy = CudaCheckpointStrategy(driver(kind))  # type: ignore[arg-type]
    gib = 2.0 if tree else 4.0
    argv = [sys.executable, str(ENGINE), str(gib), *(["--child", str(gib)] if tree else [])]
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("ready")
        pids = cuda_processes(proc.pid)
        assert len(pids) == (2 if tree else 1)
        held = gpu_memory_of(pids)
        assert held >= gib * len(pids) * 0.95 * 2**30

        t0 = time.monotonic()
        suspended = anyio.run(strategy.suspend, proc.pid)
        t_suspend = time.monotonic() - t0
        assert sorted(suspended) == sorted(pids)
        assert anyio.run(strategy.is_suspended, proc.pid)
        freed = gpu_memory_of(pids)
        # A new strategy object (as after a supervisor restart) still finds what to restore.
        fresh = CudaCheckpointStrategy(strategy.driver) if tree else strategy
        assert anyio.run(fresh.is_suspended, proc.pid)
        t0 = time.monotonic()
        anyio.run(fresh.resume, proc.pid)
        t_resume = time.monotonic() - t0
        back = gpu_memory_of(pids)
        total = held / 2**30
        print(
            f"\n[{kind}, {'tree' if tree else 'single'}] held {held / 2**30:.2f} GiB -> "
            f"{freed / 2**30:.2f} GiB suspended -> {back / 2**30:.2f} GiB resumed; "
            f"suspend {t_suspend:.2f}s ({t_suspend / total:.2f} s/GiB), "
            f"resume {t_resume:.2f}s ({t_resume / total:.2f} s/GiB)"
        )
        assert freed < 0.05 * held
        assert back >= 0.95 * held
        assert ask(proc, "check").startswith("ok")  # data intact after the round trip
    finally:
        proc.kill()
        proc.wait()
