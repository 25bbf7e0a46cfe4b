"""A TCP proxy a test can cut and heal: how cluster tests partition one node from etcd or
NATS while the others stay connected."""

from __future__ import annotations

import contextlib
from typing import Any

from supervisor.testing.engineproc import free_port


class FaultProxy:
    """A TCP proxy on loopback, in a thread of its own, that a test can cut and heal.

    ``cut()`` closes every open connection and leaves new ones hanging unanswered (a
    partition, as a dropped network looks: timeouts, not refusals); ``black_hole()`` keeps
    every connection open but forwards nothing either way (a half-open link: nobody is told
    anything); ``delay(s)`` holds every chunk ``s`` seconds each way; ``one_way(...)`` drops
    what flows in one direction only (requests arrive, answers are lost, or the reverse);
    ``heal()`` forwards again (connections held or black-holed meanwhile are reset).
    """

    def __init__(self, target_port: int, host: str = "127.0.0.1") -> None:
        import asyncio
        import threading

        self.target_port = target_port
        self.host = host  # where it listens (the target is on 127.0.0.1)
        self.port = free_port(host)
        self.cut_now = False
        self.holed = False  # black hole: bytes are read and dropped, connections stay open
        self._holed_conns: set[Any] = set()  # connections black-holed one by one
        self._live: set[Any] = set()  # forwarding connections, by their client side
        self.latency = 0.0  # seconds each chunk is held, each way
        self.dropping = ""  # "to_target" or "from_target": that direction is lost
        self._conns: set[Any] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def nats_url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def _serve(self) -> None:
        import asyncio

        async def pipe(
            r: asyncio.StreamReader,
            w: asyncio.StreamWriter,
            pair: asyncio.StreamWriter,
            direction: str,
        ) -> None:
            try:
                while not self.cut_now:
                    data = await r.read(65536)
                    if not data or self.cut_now:
                        break
                    if self.holed or pair in self._holed_conns or self.dropping == direction:
                        continue  # lost on the way
                    if self.latency:
                        await asyncio.sleep(self.latency)
                    w.write(data)
                    await w.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                w.close()

        async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
            if self.cut_now or self.holed:
                self._conns.add(cw)  # held open, never answered: a black hole
                return
            try:
                ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                cw.close()
                return
            self._conns.update((cw, uw))
            self._live.add(cw)
            await asyncio.gather(pipe(cr, uw, cw, "to_target"), pipe(ur, cw, cw, "from_target"))
            self._conns.discard(cw)
            self._conns.discard(uw)
            self._live.discard(cw)

        async def main() -> None:
            server = await asyncio.start_server(handle, self.host, self.port)
            self._ready.set()
            async with server:
                await server.serve_forever()

        asyncio.set_event_loop(self._loop)
        with contextlib.suppress(RuntimeError, asyncio.CancelledError):  # closed
            self._loop.run_until_complete(main())
        # The connections' tasks, cancelled by close(), finish before the thread ends.
        rest = asyncio.all_tasks(self._loop)
        with contextlib.suppress(RuntimeError, asyncio.CancelledError):
            self._loop.run_until_complete(asyncio.gather(*rest, return_exceptions=True))

    def cut(self) -> None:
        def close_all() -> None:
            self.cut_now = True
            for w in list(self._conns):
                with contextlib.suppress(Exception):
                    w.transport.abort()
            self._conns.clear()

        self._loop.call_soon_threadsafe(close_all)

    def black_hole(self, *, existing_only: bool = False) -> None:
        """Forward nothing, keep connections open. ``existing_only``: just the connections
        open now go silent (a long-lived stream, a pooled connection); new ones work (as
        after a NAT or conntrack entry is lost)."""

        def hole() -> None:
            if existing_only:
                self._holed_conns |= self._live
            else:
                self.holed = True

        self._loop.call_soon_threadsafe(hole)

    def delay(self, seconds: float) -> None:
        def slow() -> None:
            self.latency = seconds

        self._loop.call_soon_threadsafe(slow)

    def one_way(self, lost: str) -> None:
        """Lose what flows ``lost`` ("to_target": requests; "from_target": answers)."""
        assert lost in ("to_target", "from_target")

        def drop() -> None:
            self.dropping = lost

        self._loop.call_soon_threadsafe(drop)

    def heal(self) -> None:
        def reopen() -> None:
            if self.cut_now or self.holed:  # connections held meanwhile: drop them now
                for w in list(self._conns):
                    with contextlib.suppress(Exception):
                        w.transport.abort()
                self._conns.clear()
            if self.dropping:  # half of those streams is lost: they cannot go on
                self._holed_conns |= self._live
            for w in self._holed_conns:
                with contextlib.suppress(Exception):
                    w.transport.abort()
            self._holed_conns.clear()
            self.cut_now = self.holed = False
            self.latency, self.dropping = 0.0, ""

        self._loop.call_soon_threadsafe(reopen)

    def close(self) -> None:
        import asyncio

        def shutdown() -> None:
            # Every task ends (the server's first), so none is left unfinished.
            for task in asyncio.all_tasks(self._loop):
                task.cancel()

        self._loop.call_soon_threadsafe(shutdown)
        self._thread.join(5)
