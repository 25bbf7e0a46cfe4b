from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from supervisor.testing.gpuledger import LEDGER_ENV


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def own_gpu_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own simulated GPUs, so tests never see each other's engines."""
    path = tmp_path / "gpu-ledger.json"
    monkeypatch.setenv(LEDGER_ENV, str(path))
    return path


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# -- no process outlives its tests ---------------------------------------------------------
# Every process this run starts inherits this mark in its environment (daemons pass theirs on
# to their engines), so the check below sees this run's processes only, not another's.
_MARK = f"FAILOVER_TEST_RUN={uuid.uuid4().hex}"
os.environ["FAILOVER_TEST_RUN"] = _MARK.split("=", 1)[1]


def _our_processes() -> dict[int, str]:
    """Processes started by this test run (daemons, simulated engines, etcd, NATS), by pid."""
    found = {}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            if _MARK.encode() not in environ.split(b"\0"):
                continue
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found[int(entry)] = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    return found


@pytest.fixture(autouse=True, scope="module")
def no_leaked_processes() -> Iterator[None]:
    """Fails a test module that leaves a daemon, engine, etcd or NATS process behind (and
    kills what it left, so the next module starts clean)."""
    before = set(_our_processes())
    yield
    deadline = time.monotonic() + 15
    while True:
        left = {p: c for p, c in _our_processes().items() if p not in before}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, "processes left running by this module:\n" + "\n".join(
        f"  {pid}: {cmd[:200]}" for pid, cmd in left.items()
    )
