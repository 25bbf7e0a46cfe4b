import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.testing.gpuledger import GIB, GpuLedger, SimulatedOOM, process_ref


def test_allocations_beyond_capacity_raise_cuda_like_oom(tmp_path: Path) -> None:
    ledger = GpuLedger(tmp_path / "l.json", capacity_gib=10)
    me = [process_ref(__import__("os").getpid())]
    ledger.allocate("a", "weights", ["0"], 6 * GIB, me)
    with pytest.raises(SimulatedOOM, match="CUDA out of memory"):
        ledger.allocate("b", "weights", ["0"], 6 * GIB, me)
    ledger.allocate("b", "weights", ["1"], 6 * GIB, me)  # another GPU has room
    ledger.free("a")
    ledger.allocate("b", "kv_cache", ["0"], 6 * GIB, me)
    assert ledger.held_by("b") == {"weights": 6 * GIB, "kv_cache": 6 * GIB}


def test_memory_is_held_until_every_process_of_the_owner_is_gone(tmp_path: Path) -> None:
    ledger = GpuLedger(tmp_path / "l.json", capacity_gib=10)
    p1 = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    p2 = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ledger.allocate("eng", "weights", ["0"], 8 * GIB, [process_ref(p1.pid)])
        ledger.add_process("eng", process_ref(p2.pid))
        p1.kill()
        p1.wait()
        assert ledger.usage()["0"].used == 8 * GIB  # the worker still holds it
        p2.kill()
        p2.wait()
        assert ledger.usage()["0"].used == 0
    finally:
        for p in (p1, p2):
            p.kill()
            p.wait()


def test_a_reused_pid_does_not_keep_memory(tmp_path: Path) -> None:
    ledger = GpuLedger(tmp_path / "l.json", capacity_gib=10)
    pid = __import__("os").getpid()
    ref = process_ref(pid)
    ledger.allocate("eng", "weights", ["0"], GIB, [[pid, ref[1] - 1]])  # same pid, other start
    assert ledger.usage()["0"].used == 0
