"""Compare etcd clients against a real etcd: the numbers behind docs/coordination.md.

    .venv/bin/python -m bench.etcd_clients [gateway] [aetcd] [etcd3]   # default: gateway aetcd

It starts its own etcd on free loopback ports and measures, per client, one after another in
the same run: put latency (p50/p99), transaction latency, how long a watch takes to deliver
a put, and what a call does across an etcd restart (how long until calls succeed again).
etcd3 and aetcd are not dependencies; install them into a scratch venv to compare.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from supervisor.coordination.etcd import Compare, EtcdClient, put_op
from supervisor.testing.cluster import free_port

N = 300


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


class Etcd:
    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.client_port, self.peer_port = free_port(), free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "etcd", "--data-dir", str(self.dir / "data"), "--name", "bench",
                "--listen-client-urls", f"http://127.0.0.1:{self.client_port}",
                "--advertise-client-urls", f"http://127.0.0.1:{self.client_port}",
                "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                "--initial-cluster", f"bench=http://127.0.0.1:{self.peer_port}",
            ],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def stop(self) -> None:
        if self.proc:
            self.proc.kill()
            self.proc.wait()


async def timed(fn: Callable[[], Awaitable[Any]], n: int = N) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t)
    return out


async def until_ok(fn: Callable[[], Awaitable[Any]], limit: float = 30) -> float:
    t = time.perf_counter()
    while time.perf_counter() - t < limit:
        try:
            await asyncio.wait_for(fn(), 2)
            return time.perf_counter() - t
        except Exception:
            await asyncio.sleep(0.01)
    return float("inf")


async def bench_gateway(etcd: Etcd) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        c = EtcdClient([f"http://127.0.0.1:{etcd.client_port}"], s)
        put = await timed(lambda: c.put(b"/b/k", b"v"))
        txn = await timed(
            lambda: c.txn([Compare(b"/b/k", "VERSION", "GREATER", 0)], [put_op(b"/b/k", b"w")])
        )
        _kvs, rev = await c.get_prefix(b"/b/")
        lat: list[float] = []

        async def watcher() -> None:
            async for _, events in c.watch_prefix(b"/b/w", rev + 1):
                for ev in events:
                    lat.append(time.perf_counter() - float(ev.kv.value))
                if len(lat) >= 100:
                    return

        task = asyncio.create_task(watcher())
        await asyncio.sleep(0.2)
        for _ in range(100):
            await c.put(b"/b/w", str(time.perf_counter()).encode())
            await asyncio.sleep(0.002)
        await asyncio.wait_for(task, 10)
        etcd.stop()
        etcd.start()
        back = await until_ok(lambda: c.put(b"/b/k", b"x"))
    return {"put": put, "txn": txn, "watch": lat, "restart": back}


async def bench_aetcd(etcd: Etcd) -> dict[str, Any]:
    import aetcd  # type: ignore[import-not-found]

    c = aetcd.Client(port=etcd.client_port)
    await c.connect()
    put = await timed(lambda: c.put(b"/b/k", b"v"))
    txn = await timed(
        lambda: c.transaction(
            compare=[c.transactions.version(b"/b/k") > 0],
            success=[c.transactions.put(b"/b/k", b"w")],
            failure=[],
        )
    )
    lat: list[float] = []
    it = await c.watch(b"/b/w")

    async def watcher() -> None:
        async for ev in it:
            lat.append(time.perf_counter() - float(ev.kv.value))
            if len(lat) >= 100:
                return

    task = asyncio.create_task(watcher())
    await asyncio.sleep(0.2)
    for _ in range(100):
        await c.put(b"/b/w", str(time.perf_counter()).encode())
        await asyncio.sleep(0.002)
    await asyncio.wait_for(task, 10)
    etcd.stop()
    etcd.start()
    back = await until_ok(lambda: c.put(b"/b/k", b"x"))
    await c.close()
    return {"put": put, "txn": txn, "watch": lat, "restart": back}


async def bench_etcd3(etcd: Etcd) -> dict[str, Any]:
    os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
    import etcd3  # type: ignore[import-not-found]

    c = etcd3.client(port=etcd.client_port)

    # Synchronous gRPC: on an event loop each call must go to a thread.
    def run(fn: Callable[[], Any]) -> Awaitable[Any]:
        return asyncio.to_thread(fn)

    put = await timed(lambda: run(lambda: c.put("/b/k", "v")))
    txn = await timed(
        lambda: run(
            lambda: c.transaction(
                compare=[c.transactions.version("/b/k") > 0],
                success=[c.transactions.put("/b/k", "w")],
                failure=[],
            )
        )
    )
    lat: list[float] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    def cb(resp: Any) -> None:
        now = time.perf_counter()
        for ev in resp.events:
            lat.append(now - float(ev.value))
        if len(lat) >= 100:
            loop.call_soon_threadsafe(done.set)

    wid = c.add_watch_callback("/b/w", cb)
    await asyncio.sleep(0.2)
    for _ in range(100):
        await run(lambda: c.put("/b/w", str(time.perf_counter())))
        await asyncio.sleep(0.002)
    await asyncio.wait_for(done.wait(), 10)
    c.cancel_watch(wid)
    etcd.stop()
    etcd.start()
    back = await until_ok(lambda: run(lambda: c.put("/b/k", "x")))
    return {"put": put, "txn": txn, "watch": lat, "restart": back}


async def main() -> None:
    if not shutil.which("etcd"):
        sys.exit("etcd is not on PATH (Debian: apt install etcd-server)")
    rows: list[tuple[str, ...]] = []
    # etcd3 and aetcd register the same proto file names: one of them per process.
    only = set(sys.argv[1:]) or {"gateway", "aetcd"}
    for key, name, fn in [
        ("gateway", "gateway (ours, aiohttp)", bench_gateway),
        ("aetcd", "aetcd (grpcio aio)", bench_aetcd),
        ("etcd3", "etcd3 (sync grpc, in threads)", bench_etcd3),
    ]:
        if key not in only:
            continue
        with tempfile.TemporaryDirectory() as d:
            etcd = Etcd(Path(d))
            etcd.start()
            await asyncio.sleep(1.0)
            try:
                r = await fn(etcd)
            except ImportError as e:
                print(f"{name}: skipped ({e})", file=sys.stderr)
                continue
            except Exception as e:
                print(f"{name}: failed: {e!r}", file=sys.stderr)
                rows.append((name, "failed", repr(e)[:60]))
                continue
            finally:
                etcd.stop()
            rows.append(
                (
                    name,
                    f"{pct(r['put'], 0.5):.2f} / {pct(r['put'], 0.99):.2f}",
                    f"{pct(r['txn'], 0.5):.2f} / {pct(r['txn'], 0.99):.2f}",
                    f"{statistics.median(r['watch']) * 1000:.2f}",
                    f"{r['restart']:.2f}",
                )
            )
            print(f"{name}: done", file=sys.stderr)
    print(
        "| client | put p50/p99 ms | txn p50/p99 ms | watch delivery p50 ms "
        "| calls ok again after restart, s |"
    )
    print("|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    asyncio.run(main())
