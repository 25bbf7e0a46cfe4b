"""sd_notify on a real unix datagram socket, and the shipped unit checked by systemd."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import anyio
import pytest

from supervisor.testing.cluster import sim_slot, start_supervisor

ROOT = Path(__file__).parents[2]


@contextlib.asynccontextmanager
async def notify_socket(path: Path) -> AsyncIterator[list[str]]:
    """A NOTIFY_SOCKET read as systemd does, from the start: the messages as they come."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    messages: list[str] = []

    async def read() -> None:
        while True:
            await anyio.wait_readable(sock)
            messages.append(sock.recv(4096).decode())

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            yield messages
            tg.cancel_scope.cancel()
    finally:
        sock.close()


async def _until(pred: Callable[[], bool], timeout: float = 10) -> None:
    with anyio.fail_after(timeout):
        while not pred():
            await anyio.sleep(0.01)


@pytest.mark.anyio
async def test_ready_watchdog_stopping_in_order(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    async with notify_socket(path) as messages:
        sup = await start_supervisor(
            tmp_path,
            [sim_slot("s")],
            env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"},
        )
        try:
            with anyio.fail_after(10):
                while not any("READY=1" in m for m in messages):
                    await anyio.sleep(0.01)
            async with (
                aiohttp.ClientSession() as http,
                http.get(sup.admin_url + "/status") as r,
            ):
                st = await r.json()
            assert st["ready"]
            assert {e["state"] for e in st["engines"]} == {"active", "sleeping"}
            await anyio.sleep(0.5)  # watchdog pings keep coming while the loop runs
            sup.proc.send_signal(15)
            assert await anyio.to_thread.run_sync(sup.proc.wait) == 0
            await anyio.sleep(0.1)
        finally:
            if sup.proc.poll() is None:
                sup.stop()
    kinds = [m.split("\n")[0].split("=")[0] for m in messages]
    first_ready = kinds.index("READY")
    assert kinds[0] in ("STATUS", "WATCHDOG")  # starting, before READY
    assert kinds.count("WATCHDOG") >= 3
    assert "STOPPING" in kinds and kinds.index("STOPPING") > first_ready
    assert any(m.startswith("READY=1\nSTATUS=serving 1/1 slots") for m in messages)


@pytest.mark.anyio
async def test_reload_and_pause_are_told_to_systemd(tmp_path: Path) -> None:
    """SIGHUP (systemctl reload): RELOADING=1 with its time, then READY=1 again; a pause
    shows in the STATUS= line of systemctl status."""
    path = tmp_path / "notify.sock"
    async with notify_socket(path) as messages:
        sup = await start_supervisor(tmp_path, [sim_slot("s")], env={"NOTIFY_SOCKET": str(path)})
        try:
            await _until(lambda: any("READY=1" in m for m in messages))
            sup.proc.send_signal(signal.SIGHUP)
            await _until(lambda: any(m.startswith("RELOADING=1") for m in messages))
            reloading = next(m for m in messages if m.startswith("RELOADING=1"))
            assert "MONOTONIC_USEC=" in reloading
            # Read the live list each time: a slice taken now would miss a READY=1 that
            # comes after it (the reload takes a moment).
            at = messages.index(reloading)
            await _until(lambda: any(m.startswith("READY=1") for m in messages[at + 1 :]))
            async with (
                aiohttp.ClientSession() as http,
                http.post(sup.admin_url + "/pause", json={"reason": "kernel"}) as r,
            ):
                assert r.status == 200
            await _until(lambda: any("STATUS=PAUSED (kernel)" in m for m in messages))
        finally:
            assert await anyio.to_thread.run_sync(sup.stop) == 0


def test_no_notify_socket_means_no_notifications() -> None:
    from supervisor.sdnotify import Notifier

    n = Notifier({})
    assert not n.enabled and n.watchdog_interval is None
    anyio.run(n.ready, "x")  # a no-op, not an error


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian package systemd)",
)
def test_shipped_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = (ROOT / "systemd" / "failover-supervisor.service").read_text()
    # verify checks that ExecStart's program exists: point it at this checkout's command.
    exe = Path(sys.executable).with_name("failover-supervisor")
    assert "\nExecStart=failover-supervisor run " in unit  # the command as the docs spell it
    unit = unit.replace("ExecStart=failover-supervisor", f"ExecStart={exe}")
    target = tmp_path / "failover-supervisor.service"
    target.write_text(unit)
    out = subprocess.run(
        ["systemd-analyze", "verify", str(target)],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
    )
    problems = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if "failover-supervisor.service" in line
    ]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr
