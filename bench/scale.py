"""A fleet on one machine: what a cluster of N nodes costs its daemons, etcd and NATS.

    .venv/bin/python -m bench.scale [--nodes 10,30,100,300,1000] [--seconds 10] [--requests 300]
                          [--losses 8] [--per-process 100] [--json F] [--plot F.png]

One real etcd and one real nats-server; two full daemons (``node-a`` starts first and
leads, ``node-b`` follows), each with one simulated slot; and N *virtual nodes*, many per
process (``--per-process``), each as the daemons see a node of 8 engines: its own lease and
keep-alives (a third of the TTL), its ``nodes/``, ``election/``, 8 ``engines/`` and 8
``slots/`` keys, its watch of the cluster's prefix (which delivers every change and the
leader's clock), and its beats on NATS at the configured interval (subscribed, as a node
is, to its own subject and its ring predecessors'). For each N (0 first, the baseline) it
reports:

- cold start: the N virtual nodes started at once beside the running daemons; seconds
  until all of them have joined (lease and keys in etcd), and until every daemon's
  ``/status`` agrees: the other daemon and the N nodes alive, their 8·N + 2 slots known,
  and the same leader;
- CPU per non-streaming request through ``node-b``'s frontend (its process CPU during the
  requests, less its idle CPU over as long), and the ratio to N = 0;
- the leader's CPU at rest (share of a core);
- event-loop lag on the leader (``node-a``) and a follower (``node-b``, which serves the
  requests), at rest and during the requests: the daemons' own
  ``failover_supervisor_event_loop_lag_seconds`` histogram, scraped before and after the
  period and differenced. p99 is estimated as Prometheus's ``histogram_quantile`` does
  (linear within the bucket that holds it); max is the upper edge of the highest bucket
  reached, a bound ("≤ 5 ms"), not a reading;
- etcd's requests and bytes out per second (its ``/metrics``), NATS messages in and out
  per second and slow consumers (its ``/varz``), NATS deliveries per published beat, and
  the messages it delivers each second to the leader's and the follower's connections
  (its ``/connz``);
- node loss: a virtual node stops (its keep-alives and beats end, as when it dies); each of
  its 8 slots has a sleeping shadow on another virtual node; from its last keep-alive to
  the leader's promotion of each slot, p50 / max, against lease TTL + 0.5 s.
- leader loss: the leading daemon is SIGKILLed (its engines too); seconds until the other
  says it leads.

Then the log-log slope of each figure against N (least squares over the measured N > 0),
and where the machine could not host N (a size left out of ``--nodes``, or one that failed)
the value at 1,000 extrapolated from that slope, labelled so. ``--plot`` draws the costs
and the times against N on log-log axes, with their slopes.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
from prometheus_client.parser import text_string_to_metric_families

from supervisor.config import ClusterConfig
from supervisor.coordination.etcd import EtcdClient, EtcdError, LeaseExpired, prefix_end, put_op
from supervisor.coordination.nats import ring_predecessors, subject
from supervisor.testing.cluster import (
    EtcdCluster,
    NatsServer,
    SupervisorProcess,
    sim_slot,
    start_supervisor,
)
from supervisor.testing.gpuledger import LEDGER_ENV

ENGINES = 8  # per virtual node, as on an 8-GPU host
CLUSTER = "scale"
PREFIX = "/failover-supervisor"
DAEMONS = ("node-a", "node-b")
# The virtual nodes a node-loss trial stops (the next one up hosts their slots' shadows).
VICTIMS = tuple(range(1, 21, 2))


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def vname(i: int) -> str:
    return f"v{i:04d}"


def _cpu_seconds(pid: int) -> float:
    """A process's CPU time, summed over its threads from their ``schedstat`` (in
    nanoseconds: /proc's user and system times count 10 ms ticks, too coarse for a round
    of requests)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


# -- the virtual nodes (a child process hosts many) ------------------------------------------
class WireNats:
    """Just enough of the NATS client protocol for the virtual nodes: subscribe, publish,
    answer the server's pings, and read every delivered message without parsing it. The
    server's work (matching, fan-out, delivery) is what a fleet costs it and is the same as
    for a full client; the virtual nodes' process, which shares the 2 cores with the
    daemons measured, spends next to nothing on a beat."""

    def __init__(self) -> None:
        self.stream: Any = None
        self._out: list[bytes] = []
        self._sid = 0
        self.received_bytes = 0
        self._sending = anyio.Lock()  # one writer at a time on the socket

    async def _send(self, data: bytes) -> None:
        async with self._sending:
            await self.stream.send(data)

    async def connect(self, url: str, name: str) -> None:
        host, port = url.removeprefix("nats://").rsplit(":", 1)
        self.stream = await anyio.connect_tcp(host, int(port))
        info = b""
        with anyio.fail_after(5):
            while not info.endswith(b"\r\n"):
                info += await self.stream.receive()
        opts = {"verbose": False, "pedantic": False, "name": name, "lang": "bench", "version": "0"}
        await self._send(b"CONNECT " + orjson.dumps(opts) + b"\r\n")

    async def subscribe(self, subj: str) -> None:
        self._sid += 1
        await self._send(f"SUB {subj} {self._sid}\r\n".encode())

    def publish(self, subj: str, payload: bytes) -> None:
        """Queued; :meth:`flush` sends what is queued in one write."""
        self._out.append(b"PUB %s %d\r\n%s\r\n" % (subj.encode(), len(payload), payload))

    async def flush(self) -> None:
        if self._out:
            data, self._out = b"".join(self._out), []
            await self._send(data)

    async def drain(self) -> None:
        """Read (and drop) what the server delivers; a PING gets its PONG."""
        tail = b""
        while True:
            chunk = await self.stream.receive(1 << 20)
            self.received_bytes += len(chunk)
            if b"PING\r\n" in tail + chunk[:8] or b"\nPING\r\n" in chunk:
                await self._send(b"PONG\r\n")
            tail = chunk[-8:]


class WireWatch:
    """A virtual node's watch of the cluster's prefix, kept as a daemon keeps its own: one
    request on the v3 JSON gateway, its streamed answer read and dropped unparsed. etcd's
    work for each watcher (every change, the clock) is what a fleet costs it; decoding
    the same event a hundred times in one process on the machine's 2 cores is not."""

    def __init__(self, etcd_url: str, prefix: bytes) -> None:
        host, port = etcd_url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        body = orjson.dumps(
            {
                "create_request": {
                    "key": base64.b64encode(prefix).decode(),
                    "range_end": base64.b64encode(prefix_end(prefix)).decode(),
                }
            }
        )
        self.request = (
            b"POST /v3/watch HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body)
        )

    async def run(self) -> None:
        while True:
            try:
                async with await anyio.connect_tcp(self.host, self.port) as stream:
                    await stream.send(self.request)
                    while True:
                        await stream.receive(1 << 16)
            except (OSError, anyio.EndOfStream, anyio.BrokenResourceError):
                await anyio.sleep(0.5)


class VirtualNodes:
    """Virtual nodes ``first .. first + count - 1``, in this process: keys, leases,
    keep-alives, watches and beats, as a daemon of 8 engines makes them."""

    def __init__(self, etcd_url: str, nats_url: str, first: int, count: int, total: int):
        self.etcd_url, self.nats_url = etcd_url, nats_url
        self.names = [vname(i) for i in range(first, first + count)]
        self.everyone = [vname(i) for i in range(total)] + list(DAEMONS)
        self.total = total
        self.cl = ClusterConfig()
        self.root = f"{PREFIX}/{CLUSTER}/".encode()
        self.stopped: set[str] = set()
        self.last_keepalive: dict[str, float] = {}  # when the last keep-alive was sent
        self.last_acked: dict[str, float] = {}  # ... and when etcd's answer to it came

    def key(self, *parts: str) -> bytes:
        return self.root + "/".join(parts).encode()

    async def run(self) -> None:
        conn = aiohttp.TCPConnector(limit=32)
        async with aiohttp.ClientSession(connector=conn) as http:
            etcd = EtcdClient([self.etcd_url], http, timeout=5)
            nc = WireNats()
            await nc.connect(self.nats_url, "bench.scale virtual nodes")
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(nc.drain)
                    await self._subscribe(nc)
                    limit = anyio.CapacityLimiter(16)  # joining: a few at a time
                    for name in self.names:
                        tg.start_soon(self._node, etcd, name, limit)
                    tg.start_soon(self._beats, nc)
                    tg.start_soon(self._commands, tg)
            finally:
                await nc.stream.aclose()

    async def _subscribe(self, nc: WireNats) -> None:
        # What a node does with a beat is measured on the daemons, not here: the beats are
        # delivered (the server's work) and dropped unread.
        for name in self.names:
            for peer in ring_predecessors(self.everyone, name) | {name}:
                await nc.subscribe(subject(CLUSTER, peer))

    async def _node(self, etcd: EtcdClient, name: str, limit: Any) -> None:
        async with anyio.create_task_group() as tg:
            await self._live(etcd, tg, name, limit)
            tg.cancel_scope.cancel()  # stopped: its watch goes with it

    async def _live(self, etcd: EtcdClient, tg: Any, name: str, limit: Any) -> None:
        joined = False
        while name not in self.stopped:
            try:
                async with limit:
                    lease = await etcd.grant(self.cl.lease_ttl)
                    # All its keys in one transaction: a daemon puts them one by one, but
                    # hundreds of nodes joining at once on 2 cores would outlive their leases.
                    await etcd.txn([], self._keys(name, lease))
            except EtcdError:
                await anyio.sleep(0.5)
                continue
            if not joined:
                joined = True
                tg.start_soon(WireWatch(self.etcd_url, self.root).run)
                print(json.dumps({"joined": name}), flush=True)
            while name not in self.stopped:
                await anyio.sleep(self.cl.lease_ttl / 3)
                if name in self.stopped:
                    return
                try:
                    self.last_keepalive[name] = time.time()
                    await etcd.keepalive(lease, timeout=self.cl.lease_ttl / 3)
                    self.last_acked[name] = time.time()
                except LeaseExpired:
                    break  # joins again, as a daemon does
                except EtcdError:
                    continue

    def _keys(self, name: str, lease: int) -> list[dict[str, Any]]:
        ops = [
            put_op(self.key("nodes", name), b'{"admin": ""}', lease),
            put_op(self.key("election", name), name.encode(), lease),
        ]
        for s in range(ENGINES):
            eid = f"{name}.s{s}-0"
            ops.append(put_op(self.key("engines", eid), self._engine(name, s, eid), lease))
            rec = {"epoch": 1, "active": eid, "nodes": [name], "by": name, "reason": "start"}
            ops.append(put_op(self.key("slots", f"{name}-s{s}"), orjson.dumps(rec)))
        prev_i = int(name[1:]) - 1
        if prev_i in VICTIMS:
            # Sleeping shadows of the victim's slots, for the node-loss trials.
            prev = vname(prev_i)
            for s in range(ENGINES):
                eid = f"{name}.of-{prev}-s{s}"
                value = self._engine(name, s, eid, slot=f"{prev}-s{s}", state="sleeping")
                ops.append(put_op(self.key("engines", eid), value, lease))
        return ops

    def _engine(self, node: str, s: int, eid: str, slot: str = "", state: str = "active") -> bytes:
        return orjson.dumps(
            {
                "node": node,
                "slot": slot or f"{node}-s{s}",
                "model": "virtual-model",
                "backend": "vllm",
                "role": "active" if state == "active" else "shadow",
                "state": state,
                "url": "http://127.0.0.1:9",
                "unit": eid,
                "rank": 0,
                "group_size": 1,
                "serves": True,
            }
        )

    async def _beats(self, nc: WireNats) -> None:
        interval = self.cl.heartbeat_interval
        seq = 0
        while True:
            seq += 1
            began = time.monotonic()
            for k, name in enumerate(self.names):
                if name not in self.stopped:
                    beat = {"node": name, "run": "bench", "seq": seq, "interval": interval}
                    beat["admin"] = ""
                    nc.publish(subject(CLUSTER, name), orjson.dumps(beat))
                if k % 20 == 19:  # spread over the interval, as independent nodes would be
                    await nc.flush()
                    await anyio.sleep(interval * 20 / max(len(self.names), 1) * 0.8)
            await nc.flush()
            await anyio.sleep(max(0.0, interval - (time.monotonic() - began)))

    async def _commands(self, tg: Any) -> None:
        async with anyio.wrap_file(sys.stdin) as stdin:
            async for line in stdin:
                cmd, _, arg = line.strip().partition(" ")
                if cmd == "stop" and arg in self.names:
                    self.stopped.add(arg)
                    await anyio.sleep(self.cl.lease_ttl / 3 + 0.1)  # no keep-alive is mid-way
                    last = self.last_keepalive.get(arg, 0.0)
                    acked = self.last_acked.get(arg, 0.0)
                    print(
                        json.dumps({"stopped": arg, "last_keepalive": last, "acked": acked}),
                        flush=True,
                    )
                elif cmd == "quit":
                    tg.cancel_scope.cancel()
                    return


# -- the measuring side ----------------------------------------------------------------------
async def _scrape(http: aiohttp.ClientSession, etcd_url: str, varz: str) -> dict[str, float]:
    async with http.get(etcd_url + "/metrics") as r:
        text = await r.text()
    out = {"etcd_requests": 0.0, "etcd_bytes_out": 0.0, "lease_grants": 0.0}
    for line in text.splitlines():
        if line.startswith("etcd_debugging_lease_granted_total "):
            out["lease_grants"] = float(line.rsplit(" ", 1)[1])
        if line.startswith("grpc_server_handled_total{"):
            out["etcd_requests"] += float(line.rsplit(" ", 1)[1])
        elif line.startswith("etcd_network_client_grpc_sent_bytes_total"):
            out["etcd_bytes_out"] += float(line.rsplit(" ", 1)[1])
    async with http.get(varz) as r:
        v = await r.json()
    out |= {k: float(v[k]) for k in ("in_msgs", "out_msgs", "out_bytes", "slow_consumers")}
    # What the server delivered to each daemon's own connection (its name says whose).
    async with http.get(varz.replace("/varz", "/connz")) as r:
        conns = (await r.json()).get("connections") or []
    for name in DAEMONS:
        out[f"to_{name}"] = float(
            sum(
                c.get("out_msgs", 0)
                for c in conns
                if c.get("name") == f"failover-supervisor {name}"
            )
        )
    return out


async def _post(http: aiohttp.ClientSession, url: str) -> None:
    body = {"model": "model-node-b", "prompt": "hello", "max_tokens": 4}
    async with http.post(url + "/v1/completions", json=body) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"request failed: {r.status}")


async def cpu_per_request(
    http: aiohttp.ClientSession,
    sup: SupervisorProcess,
    n: int,
    rounds: int = 5,
    lag: LagWindow | None = None,
) -> float:
    """Microseconds of the daemon's CPU per request (its idle CPU taken off): the median
    of ``rounds`` rounds of ``n / rounds`` requests, 4 at a time, so that a moment of
    another process's load on the machine moves one round, not the figure. ``lag`` is
    begun before the first round and ended after the last."""
    pid = sup.proc.pid
    for _ in range(20):  # warm: connections, kept targets
        await _post(http, sup.frontend_url)
    c0, t0 = _cpu_seconds(pid), time.monotonic()
    await anyio.sleep(1.0)
    idle_rate = (_cpu_seconds(pid) - c0) / (time.monotonic() - t0)
    each = max(n // rounds // 4, 1)

    async def worker() -> None:
        for _ in range(each):
            await _post(http, sup.frontend_url)

    per: list[float] = []
    if lag is not None:
        await lag.begin()
    for _ in range(rounds):
        c0, t0 = _cpu_seconds(pid), time.monotonic()
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(worker)
        used = _cpu_seconds(pid) - c0 - idle_rate * (time.monotonic() - t0)
        per.append(max(used, 0.0) / (each * 4) * 1e6)
    if lag is not None:
        await lag.end()
    return sorted(per)[len(per) // 2]


LAG = "failover_supervisor_event_loop_lag_seconds"


async def lag_buckets(http: aiohttp.ClientSession, admin_url: str) -> dict[float, float]:
    """A daemon's loop-lag histogram, scraped: cumulative count by bucket upper edge."""
    async with http.get(admin_url + "/metrics") as r:
        text = await r.text()
    out: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == LAG:
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    out[float(sample.labels["le"])] = sample.value
    return out


def lag_figures(before: dict[float, float], after: dict[float, float]) -> dict[str, float]:
    """The wakes between two scrapes (the difference of their cumulative buckets): their
    number, p99 in ms estimated as Prometheus's ``histogram_quantile`` does (the bucket that
    holds the 99th percentile, interpolated linearly within it from its lower edge, 0 for
    the first; past the last finite edge, that edge), and the max in ms as the upper edge
    of the highest bucket that gained a wake (a bound, not a reading: infinite past 1 s)."""
    edges = sorted(after)
    cum = [after[e] - before.get(e, 0.0) for e in edges]
    total = cum[-1] if cum else 0.0
    if not total:
        return {"wakes": 0, "p99_ms": math.nan, "max_ms": math.nan}
    rank = 0.99 * total
    p99 = edges[-2] if len(edges) > 1 else 0.0
    for i, e in enumerate(edges):
        if cum[i] >= rank:
            lo, below = (edges[i - 1], cum[i - 1]) if i else (0.0, 0.0)
            if math.isinf(e):
                p99 = lo
            else:
                p99 = lo + (e - lo) * (rank - below) / max(cum[i] - below, 1e-12)
            break
    top = next(e for i, e in enumerate(edges) if cum[i] == total)
    return {"wakes": int(total), "p99_ms": round(p99 * 1e3, 2), "max_ms": top * 1e3}


class LagWindow:
    """The daemons' loop lag over one period: a scrape of each at :meth:`begin` and at
    :meth:`end`."""

    def __init__(self, http: aiohttp.ClientSession, sups: list[SupervisorProcess]) -> None:
        self.http, self.sups = http, sups
        self.before: list[dict[float, float]] = []
        self.result: dict[str, dict[str, float]] = {}  # by daemon, once ended

    async def begin(self) -> None:
        self.before = [await lag_buckets(self.http, s.admin_url) for s in self.sups]

    async def end(self) -> dict[str, dict[str, float]]:
        for name, sup, before in zip(DAEMONS, self.sups, self.before, strict=True):
            self.result[name] = lag_figures(before, await lag_buckets(self.http, sup.admin_url))
        return self.result


def _view(status: dict[str, Any]) -> tuple[int, int, str | None]:
    """A daemon's view of the cluster from its /status: peers alive, slots known, leader
    (past 256 slots the status is summarised, and counts are all it gives)."""
    cl = status["cluster"]
    if "summary" in cl:
        alive, slots = cl["summary"]["peers"]["alive"], cl["summary"]["slots"]
    else:
        alive = sum(1 for st in cl["peers"].values() if st == "alive")
        slots = len(cl["slots"])
    return alive, slots, cl["leader"]


async def views(
    http: aiohttp.ClientSession, sups: list[SupervisorProcess]
) -> list[tuple[int, int, str | None]]:
    """Each daemon's view: peers alive, slots known, leader."""
    out = []
    for sup in sups:
        async with http.get(sup.admin_url + "/status") as r:
            out.append(_view(await r.json()))
    return out


def views_agree(seen: list[tuple[int, int, str | None]], n: int) -> bool:
    """Every daemon sees the other daemon and the N virtual nodes alive, all their slots
    (8 per virtual node, one per daemon), and the same leader."""
    want = (n + len(seen) - 1, n * ENGINES + len(seen))
    return all(v[:2] == want and v[2] is not None and v[2] == seen[0][2] for v in seen)


async def cold_start(
    http: aiohttp.ClientSession,
    sups: list[SupervisorProcess],
    fleet: Fleet,
    etcd_url: str,
    nats_url: str,
    n: int,
    per: int,
) -> dict[str, float]:
    """The N virtual nodes started at once beside the running daemons: seconds until every
    one has joined (its lease and keys in etcd, as its own process sees it), and until
    every daemon's view agrees (:func:`views_agree`, polled every 50 ms)."""
    t0 = time.monotonic()
    await fleet.start(etcd_url, nats_url, n, per)
    joined = time.monotonic() - t0
    deadline = t0 + 60 + n * 0.2
    while not views_agree(seen := await views(http, sups), n):
        if time.monotonic() > deadline:
            # Said in the report: what each daemon saw when the bench gave up.
            raise RuntimeError(
                f"cold start: views not agreed after {time.monotonic() - t0:.0f} s; "
                + "; ".join(
                    f"{name} sees {alive} alive, {slots} slots, leader {leader}"
                    for name, (alive, slots, leader) in zip(DAEMONS, seen, strict=True)
                )
            )
        await anyio.sleep(0.05)
    return {"joined": round(joined, 2), "agreed": round(time.monotonic() - t0, 2)}


class Fleet:
    """The virtual nodes' processes."""

    def __init__(self) -> None:
        self.procs: list[Any] = []
        self.names: dict[str, Any] = {}

    async def start(self, etcd_url: str, nats_url: str, total: int, per: int) -> None:
        for first in range(0, total, per):
            count = min(per, total - first)
            args = [sys.executable, "-m", "bench.scale", "--virtual", etcd_url, nats_url]
            args += [str(first), str(count), str(total)]
            proc = await anyio.open_process(args, stderr=None)
            self.procs.append(proc)
            for i in range(first, first + count):
                self.names[vname(i)] = proc
        joined = 0
        with anyio.fail_after(60 + total * 0.2):
            for proc in self.procs:
                assert proc.stdout is not None
                buf = b""
                want = sum(1 for p in self.names.values() if p is proc)
                got = 0
                while got < want:
                    chunk = await proc.stdout.receive()
                    buf += chunk
                    got = buf.count(b'"joined"')
                joined += got
        _progress(f"  {joined} virtual nodes joined")

    async def stop_node(self, name: str) -> tuple[float, float]:
        """Stop one virtual node: when its last keep-alive was sent, and when etcd
        answered it (etcd counts the TTL from between the two)."""
        proc = self.names[name]
        await proc.stdin.send(f"stop {name}\n".encode())
        buf = b""
        with anyio.fail_after(10):
            while b'"stopped"' not in buf or not buf.endswith(b"\n"):
                buf += await proc.stdout.receive()
        said = json.loads([x for x in buf.splitlines() if b'"stopped"' in x][-1])
        return float(said["last_keepalive"]), float(said["acked"])

    async def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(Exception):
                await proc.stdin.send(b"quit\n")
        for proc in self.procs:
            with anyio.move_on_after(5):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def node_loss(
    http: aiohttp.ClientSession, etcd_url: str, fleet: Fleet, victim: str
) -> tuple[list[float], float, float]:
    """Seconds from the victim's last keep-alive (sent) to each of its slots' promotion,
    and to etcd's deletion of its ``nodes/`` key (the lease's expiry, as every node's watch
    delivers it): what etcd takes and what the leader adds after it; and how long etcd
    took to answer that keep-alive."""
    etcd = EtcdClient([etcd_url], http, timeout=5)
    root = f"{PREFIX}/{CLUSTER}/".encode()
    slots = root + f"slots/{victim}-s".encode()
    node_key = root + f"nodes/{victim}".encode()
    _, rev = await etcd.get_prefix(root + b"\x00")  # (only its revision is wanted)
    last, acked = await fleet.stop_node(victim)
    moved: dict[str, float] = {}
    expired = math.inf
    with anyio.move_on_after(ClusterConfig().lease_ttl + 10):
        async for _, events in etcd.watch_prefix(root, rev + 1):
            now = time.time()
            for ev in events:
                if ev.kv.key == node_key and not ev.kv.value:
                    expired = min(expired, now)
                if not ev.kv.key.startswith(slots):
                    continue
                rec = orjson.loads(ev.kv.value) if ev.kv.value else {}
                if rec.get("active") and not str(rec["active"]).startswith(victim + "."):
                    moved.setdefault(ev.kv.key.decode(), now)
            if len(moved) == ENGINES:
                break
    times = [t - last for t in moved.values()] + [math.inf] * (ENGINES - len(moved))
    return times, expired - last, acked - last


async def leader_loss(http: aiohttp.ClientSession, sups: list[SupervisorProcess]) -> float:
    """The leader (node-a) is SIGKILLed with its engines: seconds until node-b says it
    leads (its election key is the lowest once node-a's lease is gone)."""
    async with http.get(sups[0].admin_url + "/status") as r:
        pids = [e["pid"] for e in (await r.json())["engines"] if e["pid"]]
    killed = time.monotonic()
    sups[0].proc.kill()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    await anyio.to_thread.run_sync(sups[0].proc.wait)
    with anyio.fail_after(ClusterConfig().lease_ttl + 20):
        while True:
            async with http.get(sups[1].admin_url + "/status") as r:
                if (await r.json())["cluster"]["is_leader"]:
                    return round(time.monotonic() - killed, 3)
            await anyio.sleep(0.05)


async def one_size(n: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    etcd = EtcdCluster(work / f"etcd-{n}").start()
    nats_server = NatsServer(work).start()
    d = ClusterConfig()
    cluster = {
        "name": CLUSTER,
        "etcd_endpoints": etcd.endpoints,
        "etcd_prefix": PREFIX,
        "nats_servers": [nats_server.url],
    }
    sups: list[SupervisorProcess] = []
    fleet = Fleet()
    out: dict[str, Any] = {"nodes": n}
    try:
        for i, name in enumerate(DAEMONS):
            host = f"127.0.0.{i + 2}"
            os.environ[LEDGER_ENV] = str(work / f"ledger-{name}-{n}.json")
            sups.append(
                await start_supervisor(
                    work / f"{name}-{n}",
                    # node-b alone serves the model its requests ask for: they stay local.
                    [sim_slot(f"{name}-slot", shadows=0, model=f"model-{name}")],
                    node={"name": name, "engine_host": host},
                    admin={"host": host},
                    frontend={"host": host},
                    cluster={**cluster, "advertise_host": host},
                )
            )
        async with aiohttp.ClientSession() as http:
            if n:
                out["cold_start_s"] = await cold_start(
                    http, sups, fleet, etcd.endpoints[0], nats_server.url, n, args.per_process
                )
            await anyio.sleep(2 * d.lease_ttl)  # every view holds the fleet, the leader at rest
            leader = sups[0].proc.pid
            s0 = await _scrape(http, etcd.endpoints[0], nats_server.varz_url)
            rest = LagWindow(http, sups)
            await rest.begin()
            c0, t0 = _cpu_seconds(leader), time.monotonic()
            await anyio.sleep(args.seconds)
            wall = time.monotonic() - t0
            out["leader_idle_cpu_percent"] = round((_cpu_seconds(leader) - c0) / wall * 100, 2)
            await rest.end()
            s1 = await _scrape(http, etcd.endpoints[0], nats_server.varz_url)
            for k in s0:
                out[f"{k}_per_s"] = round((s1[k] - s0[k]) / wall, 1)
            # At rest nobody grants a lease: one granted meanwhile is a node that lost its
            # own (keep-alives late: the machine cannot host this many) and joined again.
            out["leases_lost"] = int(s1["lease_grants"] - s0["lease_grants"])
            beats = out["in_msgs_per_s"]
            out["deliveries_per_message"] = round(out["out_msgs_per_s"] / beats, 2) if beats else 0
            # The messages NATS hands the leader a second: its share of the beats.
            out["leader_msgs_per_s"] = out.pop(f"to_{DAEMONS[0]}_per_s")
            out["follower_msgs_per_s"] = out.pop(f"to_{DAEMONS[1]}_per_s")
            out["slow_consumers"] = s1["slow_consumers"]
            busy = LagWindow(http, sups)
            out["cpu_us_per_request"] = round(
                await cpu_per_request(http, sups[1], args.requests, lag=busy)
            )
            # The leader (node-a) and a follower (node-b, which serves the requests).
            out["loop_lag"] = {"rest": rest.result, "requests": busy.result}
            for phase, window in (("rest", rest), ("requests", busy)):
                for role, name in (("leader", DAEMONS[0]), ("follower", DAEMONS[1])):
                    out[f"lag_p99_ms_{role}_{phase}"] = window.result[name]["p99_ms"]
            if n:
                out["cold_start_agreed_s"] = out["cold_start_s"]["agreed"]
            if n >= 2:
                losses: list[float] = []
                expiries: list[float] = []  # last keep-alive -> etcd deletes the node's key
                after: list[float] = []  # that deletion -> the slot's promotion
                answers: list[float] = []  # the last keep-alive sent -> etcd's answer
                for victim in [v for v in VICTIMS if v + 1 < n][: args.losses]:
                    times, expiry, answered = await node_loss(
                        http, etcd.endpoints[0], fleet, vname(victim)
                    )
                    losses += times
                    expiries.append(expiry)
                    answers.append(answered)
                    after += [t - expiry for t in times]
                losses.sort()
                after.sort()
                out["node_loss_s"] = {
                    "n": len(losses),
                    "p50": round(losses[len(losses) // 2], 3),
                    "p99": round(
                        losses[min(len(losses) - 1, math.ceil(0.99 * len(losses)) - 1)], 3
                    ),
                    "max": round(losses[-1], 3),
                    "bound": d.lease_ttl + 0.5,
                    "etcd_expiry": [round(x, 3) for x in sorted(expiries)],
                    "leader_ms_p50": round(after[len(after) // 2] * 1000, 1),
                    "leader_ms_max": round(after[-1] * 1000, 1),
                    # etcd starts the TTL between the keep-alive's sending and its answer.
                    "keepalive_answer_ms_max": round(max(answers) * 1000, 1),
                }
            out["leader_loss_s"] = await leader_loss(http, sups)
    finally:
        await fleet.close()
        for sup in sups:
            await anyio.to_thread.run_sync(sup.stop)
        nats_server.stop()
        etcd.stop()
    return out


COSTS = (
    "cpu_us_per_request",
    "leader_idle_cpu_percent",
    "leader_msgs_per_s",
    "etcd_requests_per_s",
    "etcd_bytes_out_per_s",
    "in_msgs_per_s",
    "out_msgs_per_s",
)
TIMES = (
    "cold_start_agreed_s",
    "lag_p99_ms_leader_rest",
    "lag_p99_ms_follower_rest",
    "lag_p99_ms_leader_requests",
    "lag_p99_ms_follower_requests",
)
FIGURES = COSTS + TIMES


def slope(points: list[tuple[float, float]]) -> float | None:
    """The least-squares slope of log(y) against log(x)."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


def linear(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """The least-squares line y = a + b·x through ``points``: (a, b)."""
    if len(points) < 2:
        return None
    mx = sum(p[0] for p in points) / len(points)
    my = sum(p[1] for p in points) / len(points)
    den = sum((p[0] - mx) ** 2 for p in points)
    if not den:
        return None
    b = sum((p[0] - mx) * (p[1] - my) for p in points) / den
    return my - b * mx, b


def fit(sizes: list[dict[str, Any]], at: int = 1000) -> dict[str, Any]:
    """Each figure's slope against N, and its value at ``at`` nodes (measured if it was,
    else extrapolated from the largest measured N along the slope). A cost with a large
    part that does not grow (a daemon's CPU at N = 0) has a flat log-log slope however
    steeply the rest grows, so each cost is also extrapolated along the straight line
    a + b·N fitted through every size, N = 0 included: the larger of the two is the one
    to hold against a target."""
    out: dict[str, Any] = {}
    measured = [s for s in sizes if s["nodes"] > 0]
    base = next((s for s in sizes if s["nodes"] == 0), None)
    for f in FIGURES:
        pts = [(float(s["nodes"]), float(s[f])) for s in measured if f in s]
        k = slope(pts)
        row: dict[str, Any] = {"slope": None if k is None else round(k, 3)}
        line = linear([(float(s["nodes"]), float(s[f])) for s in sizes if f in s])
        if f in COSTS and line is not None:
            row["per_node"] = round(line[1], 5)
            row[f"linear_at_{at}"] = round(line[0] + line[1] * at, 2)
        exact = next((s[f] for s in measured if s["nodes"] == at and f in s), None)
        if exact is not None:
            row[f"at_{at}"], row["extrapolated"] = exact, False
        elif k is not None and pts:
            x, y = max(pts)
            row[f"at_{at}"] = round(y * (at / x) ** k, 2)
            row["extrapolated"] = True
        if f == "cpu_us_per_request" and base and row.get(f"at_{at}") is not None:
            row["ratio_to_alone"] = round(row[f"at_{at}"] / max(base[f], 1e-9), 2)
        out[f] = row
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    sizes = [0] + [int(x) for x in args.nodes.split(",") if x.strip()]
    results = []
    for n in sizes:
        _progress(f"N = {n}")
        try:
            r = await one_size(n, args, work)
        except Exception as e:  # a size this machine cannot host: said, and extrapolated
            _progress(f"  N = {n} failed: {e!r}")
            results.append({"nodes": n, "failed": repr(e)[:300]})
            continue
        _progress("  " + json.dumps(r))
        results.append(r)
    for r in results:
        if r.get("leases_lost"):
            r["failed"] = (
                f"not hosted: {r['leases_lost']} leases lost at rest "
                "(keep-alives late on this machine); left out of the fit"
            )
    ok = [r for r in results if "failed" not in r]
    return {"sizes": results, "fit": fit(ok)}


def _lag_cell(lag: dict[str, float]) -> str:
    """p99 (interpolated) / max (a bucket's upper edge: "at most")."""
    if not lag["wakes"]:
        return "—"
    top = "> 1000" if math.isinf(lag["max_ms"]) else f"≤ {lag['max_ms']:g}"
    return f"{lag['p99_ms']} / {top} ms"


def markdown(r: dict[str, Any]) -> str:
    rows = [
        "| N | CPU/request | leader idle CPU | etcd req/s | etcd out/s | NATS in/s | NATS out/s "
        "| deliveries/beat | to leader / follower per s | node loss p50 / p99 / max (slots) "
        "| leader loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in r["sizes"]:
        if "failed" in s:
            rows.append(f"| {s['nodes']} | {s['failed'][:100]} |||||||||")
            if "cpu_us_per_request" not in s:
                continue
        nl = s.get("node_loss_s")
        loss = "—"
        if nl:
            loss = f"{nl['p50']} / {nl.get('p99', '—')} / {nl['max']} s ({nl['n']})"
            if nl.get("etcd_expiry"):
                ex = nl["etcd_expiry"]
                loss += (
                    f"; etcd {ex[0]} to {ex[-1]} s, then the leader "
                    f"{nl['leader_ms_p50']} / {nl['leader_ms_max']} ms"
                )
        rows.append(
            f"| {s['nodes']} | {s['cpu_us_per_request']} µs | {s['leader_idle_cpu_percent']} % "
            f"| {s['etcd_requests_per_s']} | {s['etcd_bytes_out_per_s'] / 1e3:.1f} kB "
            f"| {s['in_msgs_per_s']} | {s['out_msgs_per_s']} | {s['deliveries_per_message']} "
            f"| {s.get('leader_msgs_per_s', '—')} / {s.get('follower_msgs_per_s', '—')} "
            f"| {loss} | {s.get('leader_loss_s', '—')} s |"
        )
    rows += [
        "",
        "| N | loop lag p99 / max: leader at rest | follower at rest | leader, requests "
        "| follower, requests | cold start: all joined / views agree |",
        "|---|---|---|---|---|---|",
    ]
    for s in r["sizes"]:
        if "loop_lag" not in s:
            continue
        lag = [
            _lag_cell(s["loop_lag"][phase][name])
            for phase in ("rest", "requests")
            for name in DAEMONS
        ]
        cs = s.get("cold_start_s")
        cold = f"{cs['joined']} / {cs['agreed']} s" if cs else "—"
        rows.append(f"| {s['nodes']} | {' | '.join(lag)} | {cold} |")
    rows += [
        "",
        "| figure | log-log slope | at 1,000 nodes | straight line a + b·N: b | at 1,000 |",
        "|---|---|---|---|---|",
    ]
    for f, row in r["fit"].items():
        v = row.get("at_1000")
        label = "—" if v is None else f"{v}{' (extrapolated)' if row['extrapolated'] else ''}"
        if "ratio_to_alone" in row:
            label += f", {row['ratio_to_alone']}x alone"
        b, lin = row.get("per_node", "—"), row.get("linear_at_1000", "—")
        rows.append(f"| {f} | {row['slope']} | {label} | {b} | {lin} |")
    return "\n".join(rows) + "\n"


def plot(r: dict[str, Any], path: Path) -> Path:
    """Each figure against N on log-log axes, with its fitted slope: what the fleet costs
    (left), and how long things take (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [s for s in r["sizes"] if "failed" not in s and s["nodes"] > 0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, figures, title in (
        (axes[0], COSTS, "What a fleet costs, against N"),
        (axes[1], TIMES, "Cold start (s) and loop lag p99 (ms), against N"),
    ):
        for f in figures:
            pts = [(s["nodes"], s[f]) for s in sizes if s.get(f, 0) > 0]
            if pts:
                k = r["fit"][f]["slope"]
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"{f} (slope {k})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("virtual nodes N (8 engines each)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--nodes", default="10,30,100,300,1000")
    p.add_argument("--seconds", type=float, default=10.0)  # at rest: 200 wakes of the lag ticker
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--losses", type=int, default=8)  # 8 nodes' 64 slots: a p99 worth reading
    p.add_argument("--per-process", type=int, default=100)
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path, help="a PNG of every figure against N")
    p.add_argument("--virtual", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.virtual:
        etcd_url, nats_url, first, count, total = args.virtual
        fleet = VirtualNodes(etcd_url, nats_url, int(first), int(count), int(total))
        anyio.run(fleet.run)
        return
    result = anyio.run(main, args)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.plot:
        print(f"plot: {plot(result, args.plot)}")


if __name__ == "__main__":
    cli()
