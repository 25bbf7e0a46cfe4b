"""systemd's notify protocol: READY, STATUS, WATCHDOG and STOPPING datagrams.

Without ``$NOTIFY_SOCKET`` (not run by systemd with ``Type=notify``) every call is a no-op.
The watchdog is pinged from a task on the event loop, so a blocked loop stops the pings
and systemd restarts the daemon (``WatchdogSec=``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import anyio


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self.address = ("\0" + addr[1:]) if addr.startswith("@") else addr  # abstract socket
        self._sock: socket.socket | None = None
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        # Ping twice per period, as sd_watchdog_enabled(3) advises.
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and mine else None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> bool:
        """One datagram; False if it could not be sent (the reader's queue is full)."""
        if self._sock is None:
            return True
        # systemd gone or busy: a notification must never break the daemon.
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError:
            return False
        return True

    async def _send_surely(self, *lines: str, within: float = 2.0) -> None:
        """READY and STOPPING must not be lost to a full socket queue (a unix datagram
        socket queues only a few messages, e.g. while watchdog pings pile up): retry."""
        deadline = anyio.current_time() + within
        while not self.send(*lines) and anyio.current_time() < deadline:
            await anyio.sleep(0.01)

    async def ready(self, status: str) -> None:
        await self._send_surely("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    async def stopping(self, status: str = "stopping") -> None:
        await self._send_surely("STOPPING=1", f"STATUS={status}")

    async def watchdog(self) -> None:
        """Ping ``WATCHDOG=1`` while the event loop runs (returns at once if not asked for)."""
        if self.watchdog_interval is None or self._sock is None:
            return
        while True:
            self.send("WATCHDOG=1")
            await anyio.sleep(self.watchdog_interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
