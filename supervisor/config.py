"""TOML config -> validated, typed config (the tables and their defaults: ``configschema``).

Every error names the key path and what would be valid, e.g.
``slot[0].shadows: must be an integer >= 0, got "two"``. ``check-config`` prints them all.
"""

from __future__ import annotations

import os
import shutil
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from supervisor.configschema import (
    MAX_COALESCE_WINDOW,
    NVML_MODES,
    ON_EXIT,
    PLACEMENTS,
    SUSPEND_STRATEGIES,
    XID_SOURCES,
    ClusterConfig,
    Config,
    ConfigError,
    FailoverConfig,
    FrontendConfig,
    GpuConfig,
    HealthConfig,
    SlotConfig,
)


class _Reader:
    """Typed access to a TOML table that collects problems instead of raising at once."""

    def __init__(self, data: dict[str, Any], path: str, problems: list[str]) -> None:
        self.data, self.path, self.problems = data, path, problems
        self.used: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def _get(self, key: str, default: Any, kinds: tuple[type, ...], want: str) -> Any:
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, bool) and bool not in kinds:
            self.problems.append(f"{self._key(key)}: must be {want}, got {value!r}")
            return default
        if not isinstance(value, kinds):
            self.problems.append(f"{self._key(key)}: must be {want}, got {value!r}")
            return default
        return value

    def text(self, key: str, default: Any = None, *, choices: tuple[str, ...] = ()) -> Any:
        want = "one of " + ", ".join(repr(c) for c in choices) if choices else "a string"
        value = self._get(key, default, (str,), want)
        if choices and value not in choices and value is not None:
            self.problems.append(f"{self._key(key)}: must be {want}, got {value!r}")
            return default
        if value == "" and not choices:
            self.problems.append(f"{self._key(key)}: must not be empty")
        return value

    def keyword_or_path(self, key: str, default: str, keywords: tuple[str, ...]) -> str:
        """One of ``keywords``, or a file path (which must contain a ``/``: ``./readings``
        for one beside the daemon's working directory), so a misspelt keyword is an error
        instead of a file the daemon creates and polls."""
        value = self._get(key, default, (str,), "a string")
        if value in keywords or "/" in value:
            return str(value)
        names = ", ".join(repr(k) for k in keywords)
        self.problems.append(
            f"{self._key(key)}: must be one of {names}, or a file path containing '/' "
            f"(e.g. './{value}'), got {value!r}"
        )
        return default

    def number(
        self,
        key: str,
        default: float,
        *,
        minimum: float = 0.0,
        strict: bool = False,
        maximum: float | None = None,
    ) -> float:
        want = f"a number {'>' if strict else '>='} {minimum:g}"
        if maximum is not None:
            want += f" and <= {maximum:g}"
        value = self._get(key, default, (int, float), want)
        if (
            value < minimum
            or (strict and value == minimum)
            or (maximum is not None and value > maximum)
        ):
            self.problems.append(f"{self._key(key)}: must be {want}, got {value!r}")
            return default
        return float(value)

    def integer(
        self, key: str, default: Any, *, minimum: int = 0, maximum: int | None = None
    ) -> Any:
        rng = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        want = f"an integer {rng}"
        value = self._get(key, default, (int,), want)
        if value is None:
            return None
        if value < minimum or (maximum is not None and value > maximum):
            self.problems.append(f"{self._key(key)}: must be {want}, got {value!r}")
            return default
        return value

    def flag(self, key: str, default: bool) -> bool:
        return bool(self._get(key, default, (bool,), "true or false"))

    def strs(self, key: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self._get(key, list(default), (list,), "a list of strings")
        if not all(isinstance(v, str) for v in value):
            self.problems.append(f"{self._key(key)}: must be a list of strings, got {value!r}")
            return default
        return tuple(value)

    def table(self, key: str) -> _Reader:
        value = self._get(key, {}, (dict,), "a table")
        if not isinstance(value, dict):  # already reported; read the defaults
            value = {}
        return _Reader(value, self._key(key), self.problems)

    def unknown(self, known_help: str = "") -> None:
        for key in self.data:
            if key not in self.used:
                valid = ", ".join(sorted(self.used))
                self.problems.append(f"{self._key(key)}: unknown key (valid here: {valid})")


def parse(data: dict[str, Any], *, base_dir: Path | None = None) -> Config:
    problems: list[str] = []
    top = _Reader(data, "", problems)
    node = top.table("node")
    name = node.text("name", "node-1")
    state_dir = Path(node.text("state_dir", str(Config.state_dir)))
    if base_dir is not None and not state_dir.is_absolute():
        state_dir = base_dir / state_dir
    on_exit = node.text("on_exit", "stop", choices=ON_EXIT)
    engine_host = node.text("engine_host", Config.engine_host)
    node.unknown()

    admin = top.table("admin")
    admin_host = admin.text("host", "127.0.0.1")
    admin_port = admin.integer("port", 8470, minimum=0, maximum=65535)
    admin_token_file = admin.text("token_file") or ""
    admin.unknown()

    h = top.table("health")
    dh = HealthConfig()
    health = HealthConfig(
        probe_interval=h.number("probe_interval", dh.probe_interval, strict=True),
        probe_timeout=h.number("probe_timeout", dh.probe_timeout, strict=True),
        failure_threshold=h.integer("failure_threshold", dh.failure_threshold, minimum=1),
        load_timeout=h.number("load_timeout", dh.load_timeout, strict=True),
        stall_timeout=h.number("stall_timeout", dh.stall_timeout, strict=True),
        first_token_timeout=h.number("first_token_timeout", dh.first_token_timeout, strict=True),
        stall_reports=h.integer("stall_reports", dh.stall_reports, minimum=1),
    )
    h.unknown()

    f = top.table("failover")
    df = FailoverConfig()
    failover = FailoverConfig(
        memory_release_timeout=f.number("memory_release_timeout", df.memory_release_timeout),
        wake_timeout=f.number("wake_timeout", df.wake_timeout, strict=True),
        wake_oom_retry=f.number("wake_oom_retry", df.wake_oom_retry),
        shadow_sleep_level=f.integer(
            "shadow_sleep_level", df.shadow_sleep_level, minimum=1, maximum=2
        ),
        relaunch_backoff=f.number("relaunch_backoff", df.relaunch_backoff),
        relaunch_backoff_max=f.number("relaunch_backoff_max", df.relaunch_backoff_max),
        stop_grace=f.number("stop_grace", df.stop_grace),
        drain_limit=f.number("drain_limit", df.drain_limit),
        kill_dead_group=f.flag("kill_dead_group", df.kill_dead_group),
    )
    f.unknown()

    fe = top.table("frontend")
    dfe = FrontendConfig()
    frontend = FrontendConfig(
        enabled=fe.flag("enabled", dfe.enabled),
        host=fe.text("host", dfe.host),
        port=fe.integer("port", dfe.port, minimum=0, maximum=65535),
        max_inflight_per_engine=fe.integer(
            "max_inflight_per_engine", dfe.max_inflight_per_engine, minimum=1
        ),
        max_queue=fe.integer("max_queue", dfe.max_queue, minimum=0),
        queue_timeout=fe.number("queue_timeout", dfe.queue_timeout),
        migration_limit=fe.integer("migration_limit", dfe.migration_limit, minimum=0),
        access_log=fe.flag("access_log", dfe.access_log),
        engine_header=fe.flag("engine_header", dfe.engine_header),
        whole_upstream_max_tokens=fe.integer(
            "whole_upstream_max_tokens", dfe.whole_upstream_max_tokens, minimum=0
        ),
        migration_wait=fe.number("migration_wait", dfe.migration_wait),
        drain_timeout=fe.number("drain_timeout", dfe.drain_timeout),
        retry_after=fe.integer("retry_after", dfe.retry_after, minimum=0),
        max_body_bytes=fe.integer("max_body_bytes", dfe.max_body_bytes, minimum=1024),
        api_key_file=fe.text("api_key_file") or "",
        client_write_timeout=fe.number(
            "client_write_timeout", dfe.client_write_timeout, strict=True
        ),
        header_timeout=fe.number("header_timeout", dfe.header_timeout, strict=True),
        keepalive_timeout=fe.number("keepalive_timeout", dfe.keepalive_timeout, strict=True),
        max_connections=fe.integer("max_connections", dfe.max_connections, minimum=0),
        max_json_depth=fe.integer("max_json_depth", dfe.max_json_depth, minimum=8),
        coalesce_window=fe.number(
            "coalesce_window", dfe.coalesce_window, maximum=MAX_COALESCE_WINDOW
        ),
        body_timeout=fe.number("body_timeout", dfe.body_timeout, strict=True),
        max_buffered_bytes=fe.integer(
            "max_buffered_bytes", dfe.max_buffered_bytes, minimum=1024 * 1024
        ),
        max_event_bytes=fe.integer("max_event_bytes", dfe.max_event_bytes, minimum=64 * 1024),
    )
    fe.unknown()

    g = top.table("gpu")
    dg = GpuConfig()
    pci = g._get("pci", {}, (dict,), 'a table of GPU id = "PCI bus id"')
    if not all(isinstance(v, str) for v in pci.values()):
        problems.append('gpu.pci: values must be PCI bus ids like "0000:3b:00"')
        pci = {}
    gpu = GpuConfig(
        xid_source=g.keyword_or_path("xid_source", dg.xid_source, XID_SOURCES),
        nvml=g.keyword_or_path("nvml", dg.nvml, NVML_MODES),
        poll_interval=g.number("poll_interval", dg.poll_interval, strict=True),
        pci=dict(pci),
    )
    g.unknown()

    cluster = _cluster(top.table("cluster"), "cluster" in data)

    top.used.add("slot")
    raw_slots = data.get("slot", [])
    slots: list[SlotConfig] = []
    if not isinstance(raw_slots, list):
        problems.append("slot: must be an array of tables ([[slot]] sections)")
        raw_slots = []
    for i, raw in enumerate(raw_slots):
        if not isinstance(raw, dict):
            problems.append(f"slot[{i}]: must be a table ([[slot]] section), got {raw!r}")
            continue
        slot = _slot(_Reader(raw, f"slot[{i}]", problems))
        if slot is not None:
            slots.append(slot)
    top.unknown()
    if not raw_slots:
        problems.append("slot: at least one [[slot]] is required (name, model, backend, base_port)")
    _cross_checks(slots, admin_port, problems)
    if not cluster.enabled:
        for i, sc in enumerate(slots):
            if sc.hosts != "active" or sc.group_size > 1:
                problems.append(
                    f'slot[{i}]: hosts = "shadows" and group_size need a [cluster] '
                    "with etcd_endpoints (another node must host the rest)"
                )
    if not _loopback(admin_host) and not admin_token_file:
        problems.append(
            f"admin.host: {admin_host} is reachable from the network, so admin.token_file "
            "is required (anyone who reaches the admin API can fail over engines)"
        )
    if frontend.enabled and frontend.port and frontend.port == admin_port:
        problems.append(f"frontend.port: {frontend.port} is also the admin port")
    if problems:
        raise ConfigError(problems)
    return Config(
        node=name,
        state_dir=state_dir,
        admin_host=admin_host,
        admin_port=admin_port,
        admin_token_file=admin_token_file,
        on_exit=on_exit,
        health=health,
        failover=failover,
        frontend=frontend,
        gpu=gpu,
        cluster=cluster,
        engine_host=engine_host,
        slots=tuple(slots),
    )


def _cluster(c: _Reader, present: bool) -> ClusterConfig:
    d = ClusterConfig()
    out = ClusterConfig(
        name=c.text("name", d.name),
        etcd_endpoints=c.strs("etcd_endpoints"),
        etcd_prefix=c.text("etcd_prefix", d.etcd_prefix),
        etcd_timeout=c.number("etcd_timeout", d.etcd_timeout, strict=True),
        lease_ttl=c.number("lease_ttl", d.lease_ttl, strict=True),
        nats_servers=c.strs("nats_servers"),
        heartbeat_interval=c.number("heartbeat_interval", d.heartbeat_interval, strict=True),
        suspect_after=c.integer("suspect_after", d.suspect_after, minimum=1),
        probe_timeout=c.number("probe_timeout", d.probe_timeout, strict=True),
        etcd_unreachable=c.text(
            "etcd_unreachable",
            d.etcd_unreachable,
            choices=("keep-serving", "stop-promoting", "demote"),
        ),
        advertise_host=c.text("advertise_host", d.advertise_host),
    )
    c.unknown()
    if present and not out.etcd_endpoints:
        c.problems.append(
            'cluster.etcd_endpoints: required in a [cluster] (e.g. ["http://127.0.0.1:2379"]); '
            "remove [cluster] to run one node without etcd"
        )
    for e in out.etcd_endpoints:
        if not e.startswith(("http://", "https://")):
            c.problems.append(f"cluster.etcd_endpoints: {e!r} must be an http(s):// URL")
    for n in out.nats_servers:
        if not n.startswith(("nats://", "tls://")):
            c.problems.append(f"cluster.nats_servers: {n!r} must be a nats:// URL")
    if out.lease_ttl < 2:
        c.problems.append("cluster.lease_ttl: etcd leases are whole seconds; use 2 or more")
    return out


def _slot(r: _Reader) -> SlotConfig | None:
    before = len(r.problems)
    name = r.text("name")
    model = r.text("model")
    backend = r.text("backend")
    base_port = r.integer("base_port", None, minimum=1, maximum=65535)
    for key, value in (
        ("name", name),
        ("model", model),
        ("backend", backend),
        ("base_port", base_port),
    ):
        if value is None:
            r.problems.append(f"{r.path}.{key}: required")
    placement = r.text("placement", "paired", choices=PLACEMENTS)
    shadows = r.integer("shadows", 1, minimum=0)
    gpus = r.strs("gpus", ("0",))
    raw_shadow_gpus = r._get("shadow_gpus", [], (list,), "a list of GPU lists")
    shadow_gpus: list[tuple[str, ...]] = []
    for j, g in enumerate(raw_shadow_gpus):
        if not (isinstance(g, list) and g and all(isinstance(x, str) for x in g)):
            r.problems.append(
                f"{r.path}.shadow_gpus[{j}]: must be a non-empty list of GPU ids "
                f'like ["1"], got {g!r}'
            )
        else:
            shadow_gpus.append(tuple(g))
    if placement == "pooled" and shadows and len(shadow_gpus) != shadows:
        r.problems.append(
            f"{r.path}.shadow_gpus: pooled placement needs one GPU list per "
            f"shadow ({shadows}), got {len(shadow_gpus)}"
        )
    env = r._get("env", {}, (dict,), "a table of strings")
    if not all(isinstance(v, str) for v in env.values()):
        r.problems.append(f"{r.path}.env: values must be strings")
    slot_cfg = SlotConfig(
        name=name or "",
        model=model or "",
        backend=backend or "",
        base_port=base_port or 0,
        served_model_name=r.text("served_model_name"),
        shadows=shadows,
        placement=placement,
        gpus=gpus,
        shadow_gpus=tuple(shadow_gpus),
        extra_args=r.strs("extra_args"),
        shadow_extra_args=r.strs("shadow_extra_args"),
        env=dict(env),
        simulate=r.flag("simulate", False),
        sim_args=r.strs("sim_args"),
        hosts=r.text("hosts", "active", choices=("active", "shadows")),
        group_size=r.integer("group_size", 1, minimum=1),
        group_rank=r.integer("group_rank", 0, minimum=0),
        serve_requests=r.flag("serve_requests", True),
        suspend=r.text("suspend", "engine", choices=SUSPEND_STRATEGIES),
    )
    r.unknown()
    if slot_cfg.group_rank >= slot_cfg.group_size:
        r.problems.append(
            f"{r.path}.group_rank: {slot_cfg.group_rank} is not below group_size "
            f"({slot_cfg.group_size})"
        )
    if slot_cfg.hosts == "shadows" and shadows == 0:
        r.problems.append(f'{r.path}.shadows: hosts = "shadows" needs shadows >= 1')
    if base_port and base_port + shadows > 65535:
        r.problems.append(f"{r.path}.base_port: {base_port} + {shadows} shadows passes 65535")
    return slot_cfg if len(r.problems) == before else None


def _cross_checks(slots: list[SlotConfig], admin_port: int, problems: list[str]) -> None:
    from supervisor.backends import BackendError, BackendNotFound, load_backend

    names: dict[str, int] = {}
    ports: dict[int, str] = {}
    for i, s in enumerate(slots):
        if s.name in names:
            problems.append(f"slot[{i}].name: {s.name!r} is already slot[{names[s.name]}]'s name")
        names.setdefault(s.name, i)
        for port in range(s.base_port, s.base_port + s.shadows + 1):
            if port in ports:
                problems.append(
                    f"slot[{i}].base_port: port {port} is also used by "
                    f"{ports[port]}; slots need {s.shadows + 1} free ports each"
                )
            elif port == admin_port:
                problems.append(f"slot[{i}].base_port: port {port} is the admin port")
            ports.setdefault(port, f"slot {s.name!r}")
        try:
            backend = load_backend(s.backend)
        except BackendNotFound as e:
            problems.append(f"slot[{i}].backend: {e}")
            continue
        program = backend.dialect.program[0]
        if not s.simulate and shutil.which(program) is None:
            problems.append(
                f"slot[{i}].simulate: the {s.backend} engine program {program!r} is "
                "not on PATH; install the engine, or set simulate = true to run "
                "the simulator in its place"
            )
        if s.suspend == "cuda-checkpoint":
            from plugins.cuda_checkpoint import find_driver

            try:
                find_driver()
            except BackendError as e:
                problems.append(f"slot[{i}].suspend: cuda-checkpoint cannot work here: {e}")
        if s.shadows and backend.dialect.sleep_flag is None and s.suspend == "engine":
            problems.append(
                f"slot[{i}].shadows: backend {s.backend!r} has no sleep mode, so "
                'its shadows need suspend = "cuda-checkpoint" or "awake" (or set shadows = 0)'
            )


ENV_PREFIX = "FAILOVER_SUPERVISOR_"
ENV_TABLES = ("node", "admin", "health", "failover", "frontend", "gpu")


def apply_env_overrides(data: dict[str, Any], env: Mapping[str, str]) -> list[str]:
    """``FAILOVER_SUPERVISOR_<TABLE>_<KEY>=value`` sets ``[table] key`` (a TOML value, or
    a bare string), e.g. ``FAILOVER_SUPERVISOR_ADMIN_PORT=9470``. Returns what was set."""
    applied = []
    for name, raw in sorted(env.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        table = next((t for t in ENV_TABLES if rest.startswith(t + "_")), None)
        if table is None:
            raise ConfigError(
                [
                    f"${name}: not a config key; use {ENV_PREFIX}<TABLE>_<KEY> "
                    f"with TABLE one of {', '.join(ENV_TABLES)}"
                ]
            )
        key = rest[len(table) + 1 :]
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # a bare string such as a host name or a path
        data.setdefault(table, {})[key] = value
        applied.append(f"{table}.{key} (from ${name})")
    return applied


def load(path: Path, env: Mapping[str, str] | None = None) -> Config:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from e
    except UnicodeDecodeError as e:
        raise ConfigError([f"{path}: not UTF-8 text (TOML must be): {e}"]) from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: not valid TOML: {e}"]) from e
    apply_env_overrides(data, os.environ if env is None else env)
    return parse(data, base_dir=path.parent)


def read_secret(path: str, credential: str, env: Mapping[str, str] | None = None) -> str | None:
    """A secret from ``path``, else from the systemd credential ``credential``; None if
    neither is set. The value is never logged."""
    env = os.environ if env is None else env
    if not path and env.get("CREDENTIALS_DIRECTORY"):
        cred = Path(env["CREDENTIALS_DIRECTORY"]) / credential
        if cred.exists():
            path = str(cred)
    if not path:
        return None
    try:
        secret = Path(path).read_text().strip()
    except OSError as e:
        raise ConfigError([f"cannot read the {credential} file {path}: {e.strerror}"]) from e
    if not secret:
        raise ConfigError([f"the {credential} file {path} is empty"])
    return secret


def _loopback(host: str) -> bool:
    return host.startswith(("127.", "::1", "localhost"))


def warnings(cfg: Config) -> list[str]:
    """Settings that are valid but risky; check-config prints them, run logs them."""
    out = []
    if cfg.frontend.enabled and not _loopback(cfg.frontend.host) and not cfg.frontend.api_key_file:
        out.append(
            f"frontend.host: {cfg.frontend.host} serves anyone who reaches it "
            "(frontend.api_key_file is not set)"
        )
    if cfg.frontend.migration_wait < cfg.failover.wake_timeout:
        out.append(
            f"frontend.migration_wait ({cfg.frontend.migration_wait:g}s) is shorter "
            f"than failover.wake_timeout ({cfg.failover.wake_timeout:g}s): a broken "
            "stream may give up before its slot's shadow is awake"
        )
    if cfg.health.probe_timeout > cfg.health.probe_interval * cfg.health.failure_threshold:
        out.append(
            "health.probe_timeout is longer than probe_interval x failure_threshold: "
            "a hung engine is noticed only after the timeouts add up"
        )
    if (
        any(s.placement == "paired" and s.shadows for s in cfg.slots)
        and cfg.failover.wake_oom_retry == 0
    ):
        out.append(
            "failover.wake_oom_retry = 0 with paired shadows: a wake that races the "
            "dead engine's memory release fails instead of retrying"
        )
    cl = cfg.cluster
    if cl.enabled and cl.nats_servers and cl.lease_ttl < cl.heartbeat_interval * 3:
        out.append(
            f"cluster.lease_ttl ({cl.lease_ttl:g}s) is shorter than 3 heartbeats "
            f"({cl.heartbeat_interval:g}s each): leases may expire before peers even suspect"
        )
    if cl.enabled and _loopback(cfg.admin_host) and not _loopback(cl.advertise_host):
        out.append(
            f"admin.host ({cfg.admin_host}) is loopback but cluster.advertise_host "
            f"({cl.advertise_host}) is not: peers cannot reach this node's admin API to "
            "probe it (listen on the advertised address, with admin.token_file)"
        )
    if cl.enabled and not cl.nats_servers:
        out.append(
            "cluster.nats_servers is empty: a lost node is noticed only when its etcd "
            f"lease expires ({cl.lease_ttl:g}s), not from missed heartbeats"
        )
    return out


# The typed tables are imported from here too, as they always were.
__all__ = [
    "MAX_COALESCE_WINDOW",
    "NVML_MODES",
    "ON_EXIT",
    "PLACEMENTS",
    "SUSPEND_STRATEGIES",
    "XID_SOURCES",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "FailoverConfig",
    "FrontendConfig",
    "GpuConfig",
    "HealthConfig",
    "SlotConfig",
    "apply_env_overrides",
    "load",
    "parse",
    "read_secret",
    "warnings",
]
