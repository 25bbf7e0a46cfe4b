"""Every Prometheus metric of the supervisor, defined once (names follow Prometheus
conventions: ``failover_supervisor_`` prefix, ``_total`` counters, ``_seconds`` units)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from supervisor.looplag import TICK
from supervisor.metric_labels import (
    COUNTED_MODES,
    SLOT_HOOKS,
    CancelRoute,
    MigrationResult,
    RejectReason,
)
from supervisor.model import DEATH_SOURCES, FAILOVER_RESULTS, EngineState
from supervisor.slot.table import Phase

# No *_created series: they double the number of names and nobody graphs them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Failover steps are milliseconds to minutes (a real engine's wake can take a minute).
_DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
)
# How late the event loop runs a timer: a millisecond is a loop doing its work, 50 ms the
# longest hold the daemon allows itself, a second a loop stopped or starved.
_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
# Detection takes microseconds when a process exit is seen at once.
_DETECTION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, *_DURATION_BUCKETS)


class TallyCounter(Collector):
    """A counter kept as plain integers, one per label set, and read when scraped: for
    events counted on every request, where a ``Counter`` child's ``inc()`` (interpreted,
    and behind a lock) costs more than the rest of the count. The hot path adds to
    :attr:`counts` itself: ``counts[labels] = counts.get(labels, 0) + 1``."""

    _type = "counter"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name.removesuffix("_total")  # as prometheus_client keeps a counter's
        self._documentation = documentation
        self._labelnames = labelnames
        self.counts: dict[tuple[str, ...], int] = {}
        registry.register(self)

    def describe(self) -> Iterable[CounterMetricFamily]:
        return [CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)]

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for labels, n in list(self.counts.items()):  # (a copy: a scrape may run in a thread)
            family.add_metric(labels, n)
        yield family


class Metrics:
    """The supervisor's metrics in their own registry (so tests can run several daemons).

    Every label set known in advance exists at 0 from the start (Prometheus's
    ``increase()`` cannot see a series' first event); the cluster's metrics are exported
    only by a node of a cluster."""

    def __init__(self, *, cluster: bool = False) -> None:
        self.registry = r = CollectorRegistry()
        self.failovers = Counter(
            "failover_supervisor_failovers_total",
            "Failovers (and manual switchovers) by slot, reason and result.",
            ["slot", "reason", "result"],
            registry=r,
        )
        self.detection_seconds = Histogram(
            "failover_supervisor_detection_seconds",
            "From the failure's first sign (e.g. process exit) to the engine declared dead.",
            ["source"],
            buckets=_DETECTION_BUCKETS,
            registry=r,
        )
        self.wake_seconds = Histogram(
            "failover_supervisor_wake_seconds",
            "Time a shadow took to wake and become ready.",
            ["slot"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.failover_seconds = Histogram(
            "failover_supervisor_failover_seconds",
            "From the engine declared dead to its replacement promoted.",
            ["slot"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.probe_seconds = Histogram(
            "failover_supervisor_probe_seconds",
            "How long each health probe of an engine took (a probe that times out counts "
            "as its timeout). Load on the frontend must not move it.",
            ["slot"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.event_loop_lag = Histogram(
            "failover_supervisor_event_loop_lag_seconds",
            f"How late a timer of the daemon's event loop ran, sampled every {TICK * 1000:g} ms: "
            "what any work due then waited (a long synchronous pass, a GC pause, the process "
            "starved of CPU or stopped).",
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.engine_state = Gauge(
            "failover_supervisor_engine_state",
            "1 for the state each engine is in, 0 for the others.",
            ["slot", "engine", "state"],
            registry=r,
        )
        self.shadows_available = Gauge(
            "failover_supervisor_shadows_available",
            "Sleeping shadows ready to wake, per slot.",
            ["slot"],
            registry=r,
        )
        self.slot_epoch = Gauge(
            "failover_supervisor_slot_epoch",
            "The slot's epoch (grows by one on every promotion).",
            ["slot"],
            registry=r,
        )
        self.shadows_missing = Gauge(
            "failover_supervisor_shadows_missing",
            "Shadows the slot is configured for but does not have (launching ones count as "
            "had); /status says why under shadow_shortfall.",
            ["slot"],
            registry=r,
        )
        self.slot_phase = Gauge(
            "failover_supervisor_slot_phase",
            "1 for the phase each slot is in (see docs/failover.md), 0 for the others.",
            ["slot", "phase"],
            registry=r,
        )
        self.slot_degraded = Gauge(
            "failover_supervisor_slot_degraded",
            "1 while the slot has no ready active engine.",
            ["slot"],
            registry=r,
        )
        self.slot_paused = Gauge(
            "failover_supervisor_slot_paused",
            "1 while the slot is in maintenance mode (its own pause or its node's): no "
            "automatic failover or relaunch.",
            ["slot"],
            registry=r,
        )
        self.rollout_pending = Gauge(
            "failover_supervisor_slot_rollout_pending",
            "1 while a reloaded config holds a new spec for the slot that is not rolled out.",
            ["slot"],
            registry=r,
        )
        self.rollouts = Counter(
            "failover_supervisor_rollouts_total",
            "Rolling engine upgrades by slot and result (done, rolled_back, error).",
            ["slot", "result"],
            registry=r,
        )
        self.engine_relaunches = Counter(
            "failover_supervisor_engine_relaunches_total",
            "Engines relaunched (as new shadows) after they failed.",
            ["slot"],
            registry=r,
        )
        self.plugin_errors = Counter(
            "failover_supervisor_plugin_errors_total",
            "Backend plugin calls that raised, by backend and hook.",
            ["backend", "hook"],
            registry=r,
        )

        self.requests = TallyCounter(
            "failover_supervisor_frontend_requests_total",
            "Client requests answered by the frontend, by route and HTTP status.",
            ("route", "status"),
            registry=r,
        )
        self.rejections = Counter(
            "failover_supervisor_frontend_rejections_total",
            "Requests refused with 503 (saturated, no engine, draining), by reason.",
            ["reason"],
            registry=r,
        )
        self.migrations = Counter(
            "failover_supervisor_migrations_total",
            "Requests re-issued to another engine after their stream broke, by result "
            "(resumed, failed) and continuation mode (token_ids, text, reroute).",
            ["result", "mode"],
            registry=r,
        )
        self.cancellations = Counter(
            "failover_supervisor_cancellations_total",
            "Requests whose client went away; the upstream request was aborted.",
            ["route"],
            registry=r,
        )
        self.stream_suspicions = Counter(
            "failover_supervisor_stream_suspicions_total",
            "Streams that stalled on an engine: each makes it suspect; a failed probe or "
            "more stalled streams confirm it dead.",
            ["slot"],
            registry=r,
        )
        self.client_connections = Gauge(
            "failover_supervisor_client_connections",
            "Client connections open on the frontend.",
            registry=r,
        )
        self.client_connections_refused = Counter(
            "failover_supervisor_client_connections_refused_total",
            "Client connections refused at frontend.max_connections (503) or closed for "
            "sending no request head within frontend.header_timeout (408).",
            ["reason"],
            registry=r,
        )
        self.inflight = Gauge(
            "failover_supervisor_frontend_inflight",
            "Requests in flight per engine.",
            ["engine"],
            registry=r,
        )
        self.queued = Gauge(
            "failover_supervisor_frontend_queued", "Requests waiting for an engine.", registry=r
        )

        self.engine_gpu = Gauge(
            "failover_supervisor_engine_gpu",
            "1 for each GPU an engine uses: joins engine metrics with GPU metrics.",
            ["slot", "engine", "gpu"],
            registry=r,
        )
        self.gpu_healthy = Gauge(
            "failover_supervisor_gpu_healthy",
            "0 once a fatal XID or NVML marked the GPU broken, else 1.",
            ["gpu"],
            registry=r,
        )
        self.gpu_xid_events = Counter(
            "failover_supervisor_gpu_xid_events_total",
            "XID events from the kernel log, by GPU, XID and the action it maps to.",
            ["gpu", "xid", "action"],
            registry=r,
        )
        self.gpu_throttled = Gauge(
            "failover_supervisor_gpu_throttled",
            "1 while NVML reports the clocks throttled for the reason.",
            ["gpu", "reason"],
            registry=r,
        )
        self.gpu_memory_used = Gauge(
            "failover_supervisor_gpu_memory_used_bytes",
            "GPU memory in use (NVML).",
            ["gpu"],
            registry=r,
        )
        self.gpu_memory_total = Gauge(
            "failover_supervisor_gpu_memory_total_bytes",
            "GPU memory in all (NVML).",
            ["gpu"],
            registry=r,
        )
        self.gpu_ecc_uncorrected = Gauge(
            "failover_supervisor_gpu_ecc_uncorrected_errors",
            "Volatile uncorrected ECC errors (NVML).",
            ["gpu"],
            registry=r,
        )
        self.gpu_pages_pending = Gauge(
            "failover_supervisor_gpu_pages_pending_retirement",
            "1 while retired pages wait for a GPU reset (NVML).",
            ["gpu"],
            registry=r,
        )

        # Multi-node coordination: registered (exported) only on a node of a cluster.
        r = self.registry if cluster else CollectorRegistry()
        self.cluster_info = Gauge(
            "failover_supervisor_cluster_info",
            "1 on a node that is part of a cluster; labels: its name and whether NATS is used.",
            ["cluster", "nats"],
            registry=r,
        )
        self.cluster_leader = Gauge(
            "failover_supervisor_cluster_leader",
            "1 while this supervisor is the cluster's leader (it alone promotes across nodes).",
            registry=r,
        )
        self.cluster_peers = Gauge(
            "failover_supervisor_cluster_peers",
            "Peer supervisors by how this node sees them (alive, suspect, dead).",
            ["state"],
            registry=r,
        )
        self.etcd_reachable = Gauge(
            "failover_supervisor_etcd_reachable",
            "1 while this node's last etcd call succeeded and its lease is held.",
            registry=r,
        )
        self.nats_connected = Gauge(
            "failover_supervisor_nats_connected",
            "1 while this node is connected to NATS (heartbeats flow).",
            registry=r,
        )
        self.cluster_promotions = Counter(
            "failover_supervisor_cluster_promotions",
            "Epoch transactions in etcd by slot and result (committed, fenced, deferred).",
            ["slot", "result"],
            registry=r,
        )
        self.node_loss_seconds = Histogram(
            "failover_supervisor_node_loss_detection_seconds",
            "From a peer's last heartbeat to this node confirming it dead.",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )

        for result in MigrationResult:
            for mode in COUNTED_MODES:
                self.migrations.labels(result, mode)
        for route in CancelRoute:
            self.cancellations.labels(route)
        for reason in RejectReason:
            self.rejections.labels(reason)
        for source in DEATH_SOURCES:
            self.detection_seconds.labels(source)

    def init_slot(self, slot: str, backend: str, hooks: Iterable[str] = SLOT_HOOKS) -> None:
        """A slot's series at 0 from the start: its failovers by every known reason and
        result, relaunches, stalls, plugin errors."""
        for source in DEATH_SOURCES:
            for result in FAILOVER_RESULTS:
                self.failovers.labels(slot, f"failover:{source}", result)
        for reason in (
            "switchover:switchover",
            "drain:drain",
            "rollout:rollout",
            "recovery:recover",
        ):
            for result in FAILOVER_RESULTS:
                self.failovers.labels(slot, reason, result)
        self.engine_relaunches.labels(slot)
        self.slot_paused.labels(slot)
        self.rollout_pending.labels(slot)
        for result in ("done", "rolled_back", "error"):
            self.rollouts.labels(slot, result)
        self.stream_suspicions.labels(slot)
        self.wake_seconds.labels(slot)
        self.failover_seconds.labels(slot)
        for hook in hooks:
            self.plugin_errors.labels(backend, hook)

    def set_engine_state(self, slot: str, engine: str, state: EngineState) -> None:
        for s in EngineState:
            self.engine_state.labels(slot, engine, s.value).set(1 if s is state else 0)

    def set_slot_phase(self, slot: str, phase: str) -> None:
        for p in Phase:
            self.slot_phase.labels(slot, p.value).set(1 if p.value == phase else 0)

    def forget_engine(self, slot: str, engine: str, gpus: tuple[str, ...]) -> None:
        """An engine that is gone leaves the metrics: its series would stay forever."""
        for s in EngineState:
            with contextlib.suppress(KeyError):
                self.engine_state.remove(slot, engine, s.value)
        with contextlib.suppress(KeyError):
            self.inflight.remove(engine)
        for gpu in gpus:
            with contextlib.suppress(KeyError):
                self.engine_gpu.remove(slot, engine, gpu)


def reference_markdown() -> str:
    """docs/metrics.md: every metric with its type, labels and help, from the code."""
    m = Metrics(cluster=True)
    rows = []
    for metric in vars(m).values():
        name = getattr(metric, "_name", None)
        if name is None:
            continue
        kind = getattr(metric, "_type", "")
        if kind == "counter":
            name += "_total"
        labels = ", ".join(f"`{x}`" for x in getattr(metric, "_labelnames", ()))
        rows.append(
            f"| `{name}` | {kind} | {labels or '—'} | {getattr(metric, '_documentation', '')} |"
        )
    return (
        "# Metrics reference\n\n"
        "Served on the admin API at `GET /metrics` (Prometheus text format). Generated from\n"
        "`supervisor/metrics.py` by `failover-supervisor metrics-doc`; a test keeps this page\n"
        "in step with the code. Alert rules: `systemd/prometheus/alerts.yml`.\n\n"
        "Every label set known in advance (a slot's failovers by reason and result, migrations\n"
        "by result and mode, rejections by reason, ...) exists at 0 from the start, so\n"
        "`increase()` counts its first event; there are no `*_created` series; the\n"
        "`cluster_*`, `etcd_*`, `nats_*` and node-loss metrics are exported only by a node\n"
        "of a cluster; an engine's series leave with the engine.\n\n"
        "| metric | type | labels | meaning |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
