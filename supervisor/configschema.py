"""The config's typed tables: every key with its default and what it means.

:mod:`supervisor.config` reads a TOML file into these, checking every value, and re-exports
them; the key reference in ``docs/configuration.md`` follows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

PLACEMENTS = ("paired", "pooled")
ON_EXIT = ("stop", "leave")
SUSPEND_STRATEGIES = ("engine", "cuda-checkpoint", "awake", "flock")
# A longer coalescing window would hold tokens long enough for a reader to notice.
MAX_COALESCE_WINDOW = 0.05


class ConfigError(ValueError):
    """One or more problems, each ``key.path: message``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class HealthConfig:
    probe_interval: float = 0.5  # seconds between HTTP probes of each engine
    probe_timeout: float = 1.0  # a probe slower than this counts as failed (SIGSTOP, hangs)
    failure_threshold: int = 3  # consecutive failed probes that make an engine dead
    load_timeout: float = 900.0  # launch -> ready/sleeping; real engines take minutes
    stall_timeout: float = 10.0  # no token for this long on a stream = stalled (frontend)
    # A request's first token may come much later (long prefill, the engine's own queue):
    # silence before it is judged against this instead of stall_timeout.
    first_token_timeout: float = 120.0
    # A stalled stream only makes its engine *suspect*; it is declared dead when a probe
    # fails right after, or when this many different streams stalled on it within
    # 2 x stall_timeout. One client can never be enough.
    stall_reports: int = 2


@dataclass(frozen=True)
class FailoverConfig:
    memory_release_timeout: float = 30.0  # wait for a dead paired engine's group to be gone
    wake_timeout: float = 120.0  # wake call + readiness after it
    wake_oom_retry: float = 10.0  # keep retrying a wake that hits OOM for this long
    shadow_sleep_level: int = 1  # level used to put loaded shadows to sleep
    relaunch_backoff: float = 1.0  # first delay before relaunching a failed engine
    relaunch_backoff_max: float = 60.0  # the delay doubles up to this
    stop_grace: float = 10.0  # SIGTERM -> this long -> SIGKILL of the engine's group
    # A planned move (a drain or a switchover to a shadow that can wake while the old
    # engine serves): the old engine may finish its streams for this long; the rest then
    # move, token-exact, to the new one instead of being cut. 0: move at once.
    drain_limit: float = 5.0
    # When an engine's main process exits, SIGKILL what is left of its group at once (fast).
    # false: let the leftovers exit on their own (some engines' workers tear down NCCL or
    # flush state first), killing them only at memory_release_timeout.
    kill_dead_group: bool = True


# The keywords of gpu.xid_source and gpu.nvml; any other value must be a file path.
XID_SOURCES: Final = ("auto", "kmsg", "journal", "none", "off")  # "off": the same as "none"
NVML_MODES: Final = ("auto", "on", "off")


@dataclass(frozen=True)
class GpuConfig:
    # Where XID lines come from: "auto" (/dev/kmsg when readable, else none), "kmsg",
    # "journal" (journalctl -k -f), "none", or a file path to follow (tests, simulators).
    xid_source: str = "auto"
    # NVML readings: "auto" (nvidia-ml-py if installed and a driver answers), "off", or a
    # JSON file of readings (tests, simulators).
    nvml: str = "auto"
    poll_interval: float = 5.0  # seconds between NVML readings
    pci: dict[str, str] = field(default_factory=dict)  # GPU id -> PCI bus id, if no NVML


@dataclass(frozen=True)
class FrontendConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    max_inflight_per_engine: int = 64  # requests one engine takes at once from us
    max_queue: int = 256  # requests waiting for an engine; beyond: 503 at once
    queue_timeout: float = 10.0  # waiting longer than this for an engine: 503
    migration_limit: int = 3  # times one request may move to another engine
    migration_wait: float = 120.0  # how long a broken stream waits for a survivor (a wake)
    drain_timeout: float = 30.0  # on SIGTERM, in-flight requests may finish this long
    retry_after: int = 1  # seconds, in the Retry-After header of a 503
    max_body_bytes: int = 4 * 1024 * 1024
    api_key_file: str = ""  # when set, clients must send "Authorization: Bearer <key>"
    # A client that does not read its stream for this long (the relay's buffer to it is
    # full) is dropped and its request aborted upstream: back-pressure is its own problem.
    client_write_timeout: float = 30.0
    header_timeout: float = 10.0  # a connection must send a whole request head this fast
    keepalive_timeout: float = 30.0  # an idle kept-alive client connection is closed after
    # Client connections held at once (0: derived from the open-file limit, which the daemon
    # raises to its hard maximum at start). Beyond it, a new connection gets 503 and close.
    max_connections: int = 0
    max_json_depth: int = 64  # request bodies nesting deeper get 400
    # One info line per request (id, model, outcome, migrations, tokens, time). At a high
    # request rate it is about an eighth of the relay's CPU per short request; failovers,
    # migrations and errors are logged either way.
    access_log: bool = True
    # A non-streaming request that may generate at most this many tokens is asked of the
    # engine whole, not streamed: about a quarter less CPU per request for the relay (and
    # less for the engine). If its engine fails, it starts again on another one, losing at
    # most this many tokens of generation time. 0: stream every request upstream.
    whole_upstream_max_tokens: int = 16
    # A stream whose engine delivers reads less than half this apart on average (over
    # ~2,000 tokens/s for that one stream) is read at most once per window: the tokens
    # that came meanwhile take one read and one write to the client instead of one each,
    # a third to a half less CPU per token at such rates. No token waits much longer than
    # the window (seconds; uvloop's timers count whole milliseconds); a stream whose tokens
    # come further apart, as a real decode step's do, is never held. 0: read every stream
    # as it comes.
    coalesce_window: float = 0.001
    # A request's body must have arrived whole this long after its head (a body trickled
    # a byte at a time would hold its connection, and its buffer, for ever): 408 past it.
    body_timeout: float = 60.0
    # Bytes of unfinished requests (partial bodies, pipelined requests) held for all client
    # connections together; the connection that would go past it gets 503 and is closed.
    # Bounds what held bodies can cost (each is also under max_body_bytes).
    max_buffered_bytes: int = 256 * 1024 * 1024
    # The longest server-sent event line an engine may send (one token's chunk, with
    # logprobs, is a few KiB; a prompt's logprobs can be megabytes): past it the engine's
    # stream is malformed, and the request moves to another engine.
    max_event_bytes: int = 16 * 1024 * 1024
    # Name the engine that served (X-Failover-Engine, and X-Failover-Node in a cluster) in
    # each answer. Off by default: engine ids and node names are the fleet's topology,
    # which clients need not see; the access log names them either way.
    engine_header: bool = False


@dataclass(frozen=True)
class ClusterConfig:
    """Multi-node coordination: etcd for membership, election and fencing; NATS for
    heartbeats. Absent ([cluster] not in the file): one node, no servers needed."""

    name: str = "default"  # supervisors with the same etcd prefix and name form one cluster
    etcd_endpoints: tuple[str, ...] = ()  # e.g. ["http://10.0.0.1:2379", ...]
    etcd_prefix: str = "/failover-supervisor"
    etcd_timeout: float = 1.0  # deadline of one etcd call (all endpoints tried within it)
    lease_ttl: float = 3.0  # seconds; a node whose lease expires has left the cluster
    nats_servers: tuple[str, ...] = ()  # e.g. ["nats://10.0.0.1:4222"]; none: no heartbeats
    heartbeat_interval: float = 0.25  # seconds between this node's heartbeats
    suspect_after: int = 3  # missed heartbeats that make a peer suspect
    probe_timeout: float = 0.3  # the direct probe that confirms a suspect peer dead
    # What a node does while it cannot reach etcd. keep-serving: engines keep serving and a
    # same-node failover still happens (recorded in etcd on reconnect; if another node took
    # the slot meanwhile, ours steps down). stop-promoting: no promotion without etcd.
    # demote: the node stops serving before its lease can have expired (peers may then
    # promote), so two active engines for one slot are impossible; it serves again once
    # etcd says the slot is still its own. The default keeps serving: an etcd outage must
    # not stop inference, and a slot served twice for a while costs capacity, not answers.
    etcd_unreachable: str = "keep-serving"
    advertise_host: str = "127.0.0.1"  # how peers reach this node's admin API and engines

    @property
    def enabled(self) -> bool:
        return bool(self.etcd_endpoints)


@dataclass(frozen=True)
class SlotConfig:
    name: str
    model: str
    backend: str
    base_port: int
    served_model_name: str | None = None
    shadows: int = 1
    placement: str = "paired"  # paired: shadows share the active's GPUs; pooled: own GPUs
    gpus: tuple[str, ...] = ("0",)
    shadow_gpus: tuple[tuple[str, ...], ...] = ()  # pooled: one GPU list per shadow
    extra_args: tuple[str, ...] = ()
    shadow_extra_args: tuple[str, ...] = ()  # e.g. an engine's "start asleep" shadow mode
    env: dict[str, str] = field(default_factory=dict)
    simulate: bool = False  # run the simulator of the backend's dialect instead
    sim_args: tuple[str, ...] = ()
    # Multi-node only. hosts = "shadows": this node keeps only (pooled) shadows of a slot
    # whose active engine lives on another node.
    hosts: str = "active"
    group_size: int = 1  # engines on that many nodes act as one (e.g. TP across 2 nodes)
    group_rank: int = 0  # this node's member of the group; rank 0 serves requests
    # false: the frontend never routes to this slot (e.g. a disaggregated prefill engine,
    # which its decode engines call themselves)
    serve_requests: bool = True
    # How shadows release the GPU: "engine" (the engine's own sleep mode) or
    # "cuda-checkpoint" (the driver checkpoints the engine's CUDA processes to host memory;
    # for engines without a sleep mode, e.g. trtllm-serve).
    suspend: str = "engine"

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model


@dataclass(frozen=True)
class Config:
    node: str = "node-1"
    state_dir: Path = Path("/var/lib/failover-supervisor")
    admin_host: str = "127.0.0.1"
    admin_port: int = 8470
    # Mutating admin calls need "Authorization: Bearer <token>" when a token is configured:
    # read from this file, or from the systemd credential "admin-token".
    admin_token_file: str = ""
    on_exit: str = "stop"  # stop: engines are stopped with the daemon; leave: they run on
    health: HealthConfig = field(default_factory=HealthConfig)
    failover: FailoverConfig = field(default_factory=FailoverConfig)
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    gpu: GpuConfig = field(default_factory=GpuConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    engine_host: str = "127.0.0.1"  # where engines listen; peers must reach it in a cluster
    slots: tuple[SlotConfig, ...] = ()

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"
