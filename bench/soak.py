"""Chaos soak: load against a 3-node cluster while faults are injected at random.

    .venv/bin/python -m bench.soak [--minutes 15] [--seed 7] [--json report.json]

Real etcd (3 members) and nats-server; three supervisor nodes on loopback. Each node serves
one slot of the model with a paired shadow, and keeps a pooled shadow of the next node's
slot. The load client runs through the phases STANDARD (steady load), OVERFLOW (more
clients than the engines take at once: 503s are expected) and RECOVERY (no new faults). A
seeded scheduler injects, during STANDARD and OVERFLOW, one fault at a time:

- SIGKILL, SIGTERM or SIGSTOP of an active engine
- loss of a node (supervisor and engines SIGKILLed; the node comes back 5 s later)
- loss of an etcd member (restarted 3 s later)
- a nats-server restart
- a partition of a node from etcd and NATS (healed 3 s later)

The report has the counts of each fault, the load's success rate and latency, failovers and
migrations from the nodes' metrics, and the invariants:

- no failed request (a 503 rejection is not a failure; requests whose frontend died with
  its node are counted apart, as ``frontend_lost``: the relay lived on that node);
- no lost or repeated token (every answer equals the simulator's);
- no slot promoted twice for one epoch (read from etcd's history);
- no two engines serving one slot for longer than the policy allows (keep-serving: the
  3 s partition plus the step-down after it), from every node's ``/status`` sampled from
  outside throughout (``ActiveWatch``); the longest such window is in the report;
- no engine process left behind after the soak;
- no traceback in any node's log (read before a lost node's log is started afresh, and at
  the end), and every node still running at the end stops with exit status 0 on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from bench.load import LoadSpec, RequestResult, run_load, summarize
from supervisor.testing.cluster import (
    FAST_SIM_ARGS,
    ActiveWatch,
    ClusterNode,
    EtcdCluster,
    NatsServer,
    free_port_range,
    slot_history,
)

NODES = 3
FAULTS = (
    "engine-sigkill",
    "engine-sigterm",
    "engine-sigstop",
    "node-loss",
    "etcd-member-loss",
    "nats-restart",
    "partition",
)


def _progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


DOUBLE_ACTIVE_BOUND_S = 3 + 5  # the longest partition, plus the step-down after it


@dataclass
class Soak:
    workdir: Path
    seed: int
    standard_s: float
    overflow_s: float
    recovery_s: float
    rng: random.Random = field(init=False)
    faults: Counter[str] = field(default_factory=Counter)
    fault_log: list[tuple[float, str, str]] = field(default_factory=list)
    tracebacks: list[str] = field(default_factory=list)  # "node: the log line", a few
    unclean_exits: list[str] = field(default_factory=list)  # nodes whose stop was not 0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    # -- the cluster ---------------------------------------------------------------------
    def slots_for(self, i: int, ports: list[int]) -> list[dict[str, object]]:
        sim = [*FAST_SIM_ARGS, "--sim-itl", "0.004", "--sim-wake-time", "0.05"]
        own = {
            "name": f"s{i}",
            "model": "sim-model",
            "backend": "vllm",
            "base_port": ports[i],
            "shadows": 1,
            "placement": "paired",
            "gpus": ["0"],
            "simulate": True,
            "shadow_extra_args": ["--sim-start-asleep"],
            "sim_args": sim,
        }
        prev = (i - 1) % NODES
        pooled = {
            "name": f"s{prev}",
            "model": "sim-model",
            "backend": "vllm",
            "base_port": ports[NODES + i],
            "hosts": "shadows",
            "shadows": 1,
            "gpus": ["1"],
            "simulate": True,
            "sim_args": sim,
        }
        return [own, pooled]

    async def start_node(self, node: ClusterNode, i: int, ports: list[int]) -> None:
        await node.start(
            self.slots_for(i, ports),
            health={"probe_interval": 0.1, "probe_timeout": 0.3, "failure_threshold": 3},
            failover={"relaunch_backoff": 0.2, "stop_grace": 2, "wake_timeout": 20},
            frontend={
                "max_inflight_per_engine": 8,
                "max_queue": 16,
                "queue_timeout": 3,
                "migration_wait": 60,
            },
            cluster={"lease_ttl": 2, "heartbeat_interval": 0.1},
            ready_timeout=90,
        )

    # -- faults ----------------------------------------------------------------------------
    async def _active_engine(self, node: ClusterNode) -> dict[str, Any] | None:
        try:
            st = await node.status()
        except (aiohttp.ClientError, OSError):
            return None
        act = [e for e in st["engines"] if e["state"] == "active" and e["pid"]]
        return self.rng.choice(act) if act else None

    async def inject(
        self,
        kind: str,
        nodes: list[ClusterNode],
        etcd: EtcdCluster,
        nats: NatsServer,
        ports: list[int],
    ) -> str:
        live = [n for n in nodes if n.sup is not None and n.sup.proc.poll() is None]
        node = self.rng.choice(live)
        if kind.startswith("engine-"):
            # A node whose slot moved elsewhere has no active engine: pick among those with one.
            found = [(n, e) for n in live if (e := await self._active_engine(n)) is not None]
            if not found:
                return "no active engine"
            node, eng = self.rng.choice(found)
            sig = {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigstop": signal.SIGSTOP}
            try:
                os.killpg(eng["pid"], sig[kind.split("-")[1]])
            except ProcessLookupError:
                return "engine already gone"
            return f"{eng['id']} on {node.name}"
        if kind == "node-loss":
            st = await node.status()
            node.kill([e["pid"] for e in st["engines"] if e["pid"]])
            self.read_tracebacks(node)  # (its restart starts its log afresh)
            await anyio.sleep(5)
            await self.start_node(node, nodes.index(node), ports)
            return f"{node.name} (back after 5 s)"
        if kind == "etcd-member-loss":
            m = self.rng.choice([m for m in etcd.members if m.running])
            m.kill()
            await anyio.sleep(3)
            etcd.start_member(m)
            return f"{m.name}"
        if kind == "nats-restart":
            nats.stop()
            await anyio.sleep(1)
            nats.start()
            return "nats-server"
        if kind == "partition":
            links = [*node.etcd_links, *([node.nats_link] if node.nats_link else [])]
            for link in links:
                link.cut()
            await anyio.sleep(3)
            for link in links:
                link.heal()
            return f"{node.name} from etcd and NATS for 3 s"
        raise ValueError(kind)

    async def chaos(
        self,
        until: anyio.Event,
        nodes: list[ClusterNode],
        etcd: EtcdCluster,
        nats: NatsServer,
        ports: list[int],
    ) -> None:
        while not until.is_set():
            with anyio.move_on_after(self.rng.uniform(3, 6)):
                await until.wait()
            if until.is_set():
                return
            kind = self.rng.choice(FAULTS)
            what = await self.inject(kind, nodes, etcd, nats, ports)
            self.faults[kind] += 1
            self.fault_log.append((time.time(), kind, what))
            _progress(f"fault: {kind}: {what}")
            await self.settle(nodes)

    async def settle(self, nodes: list[ClusterNode], timeout: float = 30) -> None:
        """Until every slot is served and has a shadow again (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                views = [await n.status() for n in nodes if n.sup and n.sup.proc.poll() is None]
                slots = views[0]["cluster"]["slots"] if views else {}
                served = len(slots) == NODES and all(s["active"] for s in slots.values())
                sleeping = sum(1 for v in views for e in v["engines"] if e["state"] == "sleeping")
                if served and sleeping >= NODES:
                    return
            except (aiohttp.ClientError, OSError, KeyError, IndexError):
                pass
            await anyio.sleep(0.25)

    def read_tracebacks(self, node: ClusterNode) -> None:
        """Note the lines of ``node``'s log that hold a traceback: a bug, contained or not."""
        for line in node.logs().splitlines():
            if "Traceback" in line:
                self.tracebacks.append(f"{node.name}: {line[:600]}")

    async def stop_nodes(self, nodes: list[ClusterNode]) -> None:
        """SIGTERM to every node still running: each must stop with status 0."""
        for n in nodes:
            if n.sup is None or n.sup.proc.poll() is not None:
                continue  # lost by the last fault, not yet back
            code = await anyio.to_thread.run_sync(n.sup.stop)
            if code != 0:
                self.unclean_exits.append(f"{n.name}: exit status {code}")
            self.read_tracebacks(n)

    # -- the run ---------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        etcd = EtcdCluster(self.workdir / "etcd", size=3).start()
        nats = NatsServer(self.workdir).start()
        results: dict[str, list[RequestResult]] = {}
        nodes: list[ClusterNode] = []
        metrics_before: dict[str, float] = {}
        watch: ActiveWatch | None = None
        try:
            async with aiohttp.ClientSession() as session:
                ports = [free_port_range(2) for _ in range(2 * NODES)]
                for i in range(NODES):
                    work = self.workdir / f"node-{i}"
                    host = f"127.0.0.{i + 2}"  # each node on an address of its own
                    nodes.append(ClusterNode(f"node-{i}", work, etcd, nats, session, host))
                for i, n in enumerate(nodes):
                    await self.start_node(n, i, ports)
                await self.settle(nodes, timeout=60)
                _progress("cluster up: 3 nodes, 3 slots, 6 shadows")
                metrics_before = await self.counters(nodes, session)
                watch = ActiveWatch(nodes, session, interval=0.05)
                async with anyio.create_task_group() as outer:
                    outer.start_soon(watch.run)
                    await self._phases(nodes, etcd, nats, ports, results)
                    outer.cancel_scope.cancel()
                metrics_after = await self.counters(nodes, session)
                history = await slot_history(etcd.endpoints, session)
                await self.stop_nodes(nodes)
        finally:
            for n in nodes:
                await anyio.to_thread.run_sync(n.close)
            nats.stop()
            etcd.stop()
        leaked = leaked_processes(self.workdir)
        return self.report(results, metrics_before, metrics_after, history, leaked, watch)

    async def _phases(
        self,
        nodes: list[ClusterNode],
        etcd: EtcdCluster,
        nats: NatsServer,
        ports: list[int],
        results: dict[str, list[RequestResult]],
    ) -> None:
        """Load through the three phases, with faults in the first two."""
        phases = [
            ("STANDARD", self.standard_s, 12, True),
            # beyond what 3 frontends admit: 3 x (3 engines x 8 in flight + 16 queued)
            ("OVERFLOW", self.overflow_s, 200, True),
            ("RECOVERY", self.recovery_s, 12, False),
        ]
        for k, (name, seconds, clients, faults) in enumerate(phases):
            spec = LoadSpec(clients, 10**6, max_tokens=48, seed=self.seed + k)
            _progress(f"phase {name}: {seconds:.0f} s, {spec.clients} clients")
            stop = anyio.Event()
            urls = [n.sup.frontend_url for n in nodes if n.sup]
            async with anyio.create_task_group() as tg:

                async def load(
                    spec: LoadSpec = spec,
                    stop: anyio.Event = stop,
                    name: str = name,
                    urls: list[str] = urls,
                ) -> None:
                    results[name] = await run_load(urls, spec, stop=stop)

                tg.start_soon(load)
                if faults:
                    tg.start_soon(self.chaos, stop, nodes, etcd, nats, ports)
                await anyio.sleep(seconds)
                stop.set()
            if faults:
                await self.settle(nodes)

    async def counters(
        self, nodes: list[ClusterNode], session: aiohttp.ClientSession
    ) -> dict[str, float]:
        """Sums of the failover and migration counters over the nodes' /metrics."""
        out: dict[str, float] = {}
        for n in nodes:
            if not n.sup:
                continue
            try:
                async with session.get(n.admin + "/metrics") as r:
                    text = await r.text()
            except (aiohttp.ClientError, OSError):
                continue
            for name in ("failovers_total", "migrations_total", "cluster_promotions_total"):
                for m in re.finditer(
                    rf"^failover_supervisor_{name}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.M
                ):
                    out[name] = out.get(name, 0.0) + float(m.group(1))
        return out

    def report(
        self,
        results: dict[str, list[RequestResult]],
        before: dict[str, float],
        after: dict[str, float],
        history: list[tuple[int, str, int, str | None]],
        leaked: list[str],
        watch: ActiveWatch | None = None,
    ) -> dict[str, Any]:
        every = [r for rs in results.values() for r in rs]
        seen: dict[tuple[str, int], str | None] = {}
        double = []
        for _, slot, epoch, active in history:
            if active is None:
                continue
            if seen.setdefault((slot, epoch), active) != active:
                double.append(f"{slot} epoch {epoch}")
        summary = summarize(every)
        longest = watch.longest() if watch is not None else 0.0
        return {
            "seed": self.seed,
            "phases": {name: summarize(rs) for name, rs in results.items()},
            "total": summary,
            "faults": dict(self.faults),
            "fault_log": self.fault_log,
            # Counters restart with a node, so these are lower bounds.
            "failovers": after.get("failovers_total", 0) - before.get("failovers_total", 0),
            "migrations": after.get("migrations_total", 0) - before.get("migrations_total", 0),
            "invariants": {
                "no_failed_request": summary["failed"] == 0,
                "no_lost_or_repeated_token": summary["inexact"] == 0,
                "no_slot_promoted_twice_for_one_epoch": not double,
                "no_leaked_engine_process": not leaked,
                # Policy keep-serving: a node partitioned for 3 s serves on meanwhile and
                # steps down within seconds of healing; nothing longer is allowed.
                "double_active_within_bound": longest <= DOUBLE_ACTIVE_BOUND_S,
                "no_traceback_in_node_logs": not self.tracebacks,
                "every_node_stopped_cleanly": not self.unclean_exits,
            },
            "longest_double_active_ms": round(longest * 1000),
            "double_active_windows": len(watch.windows()) if watch is not None else 0,
            "double_promotions": double,
            "leaked_processes": leaked,
            "tracebacks": self.tracebacks[:10],
            "unclean_exits": self.unclean_exits,
        }


def leaked_processes(workdir: Path) -> list[str]:
    """Processes still running whose environment or command line names ``workdir``."""
    mark = str(workdir).encode()
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes()
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if mark in env or mark in cmd:
            shown = cmd.replace(b"\0", b" ").decode(errors="replace")[:120]
            out.append(f"{pid}: {shown}")
    return out


async def soak(workdir: Path, seconds: float, seed: int) -> dict[str, Any]:
    s = Soak(workdir, seed, seconds * 0.5, seconds * 0.25, seconds * 0.25)
    return await s.run()


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=15)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    report = anyio.run(soak, work, a.minutes * 60, a.seed)
    text = json.dumps(report, indent=1)
    print(text)
    if a.json:
        a.json.write_text(text)
    if not all(report["invariants"].values()):
        sys.exit(1)


if __name__ == "__main__":
    cli()
