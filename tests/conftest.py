from __future__ import annotations

from collections.abc import AsyncIterator
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
