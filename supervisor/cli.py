"""``failover-supervisor`` command line. User mistakes get a message and an exit status,
never a traceback: 2 for a bad config or bad arguments, 1 for a failure at run time."""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from supervisor import __version__
from supervisor.operate import at_time


def _err(msg: str) -> None:
    print(f"failover-supervisor: {msg}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # sim-engine forwards everything to the simulator's own parser (real engines' flags).
    if args and args[0] == "sim-engine":
        from supervisor.testing.simcli import main as sim_main

        return sim_main(args[1:])
    from supervisor.config import Config, FrontendConfig

    parser = argparse.ArgumentParser(
        prog="failover-supervisor",
        description="Keeps LLM inference engines serving through failures.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run the supervisor for this node")
    run.add_argument("--config", "-c", type=Path, required=True, help="TOML config file")
    run.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    run.add_argument(
        "--loop",
        default="auto",
        choices=("auto", "uvloop", "asyncio"),
        help="event loop: uvloop (a quarter less CPU per relayed token) when installed "
        "(auto, the default), or the standard library's",
    )
    check = sub.add_parser("check-config", help="validate a config file (exit 2 if invalid)")
    check.add_argument("config", type=Path, nargs="?")
    check.add_argument(
        "--diff",
        nargs=2,
        type=Path,
        metavar=("OLD", "NEW"),
        help="show what reloading NEW over a daemon running OLD would do",
    )
    # Every command that talks to the admin API takes the same two options.
    admin_parent = argparse.ArgumentParser(add_help=False)
    admin_parent.add_argument(
        "--admin",
        default=f"http://{Config.admin_host}:{Config.admin_port}",
        help="admin API URL (default: %(default)s)",
    )
    admin_parent.add_argument(
        "--token-file", default="", help="file holding the admin token, if one is configured"
    )
    st = sub.add_parser(
        "status",
        parents=[admin_parent],
        help="show a running supervisor's slots, engines, pauses, schedules and rollouts",
    )
    st.add_argument("--json", action="store_true", help="print the raw JSON")
    sub.add_parser(
        "reload", parents=[admin_parent], help="make a running supervisor read its config again"
    )
    pa = sub.add_parser(
        "pause",
        parents=[admin_parent],
        help="maintenance mode: no automatic failover or relaunch (a slot, or the node)",
    )
    pa.add_argument("slot", nargs="?", help="the slot (default: the whole node)")
    pa.add_argument("--for", dest="duration", type=float, help="seconds until it ends by itself")
    pa.add_argument("--reason", default="maintenance")
    re_ = sub.add_parser("resume", parents=[admin_parent], help="end a pause")
    re_.add_argument("slot", nargs="?", help="the slot (default: the whole node)")
    so = sub.add_parser(
        "switchover", parents=[admin_parent], help="move a slot to a shadow, now or later"
    )
    so.add_argument("slot")
    so.add_argument("--to", help="the shadow's engine id (default: the first asleep)")
    when = so.add_mutually_exclusive_group()
    when.add_argument(
        "--at",
        type=at_time,
        metavar="TIME",
        help="when, in local time: a time of day (03:00, the next one), a date and time "
        "(ISO 8601: 2027-01-15T03:00) or Unix seconds; not in the past",
    )
    when.add_argument("--after", type=float, help="when: seconds from now")
    when.add_argument("--cancel", action="store_true", help="cancel the scheduled switchover")
    ro = sub.add_parser(
        "rollout",
        parents=[admin_parent],
        help="roll slots to the spec of the reloaded config, one at a time, no stream lost",
    )
    ro.add_argument("slots", nargs="*", help="slots (default: every slot whose spec changed)")
    ro.add_argument("--no-reload", action="store_true", help="do not reload the config file first")
    dr = sub.add_parser(
        "drain",
        parents=[admin_parent],
        help="stop an engine gracefully: its streams finish or move (an active one's slot "
        "switches over to a shadow first)",
    )
    dr.add_argument("engine", help="the engine's id (failover-supervisor status lists them)")
    dr.add_argument(
        "--limit",
        type=float,
        metavar="SECONDS",
        help="how long its streams may take to finish before the rest move "
        "(default: failover.drain_limit)",
    )
    sub.add_parser("sim-engine", help="run a simulated engine (vllm, sglang, trtllm dialects)")
    demo = sub.add_parser("demo", help="watch a failover on simulated engines (no servers)")
    demo.add_argument(
        "--keep",
        action="store_true",
        help="leave the supervisor running afterwards (Ctrl-C to stop)",
    )
    demo.add_argument("--tokens", type=int, default=400, help="length of the demo stream")
    demo.add_argument(
        "--port",
        type=int,
        help=f"the frontend's port (default {FrontendConfig.port}, or a free one when it is taken)",
    )
    demo.add_argument(
        "--admin-port",
        type=int,
        help=f"the admin API's port (default {Config.admin_port}, or a free one when it is taken)",
    )
    sub.add_parser("backends", help="list the backend plugins found through entry points")
    sub.add_parser("dialect-doc", help="print the Dialect field reference (docs/dialect.md)")
    sub.add_parser("metrics-doc", help="print the metrics reference (docs/metrics.md)")
    ns = parser.parse_args(args)
    if ns.command == "run":
        return _run(ns.config, ns.log_level, ns.loop)
    if ns.command == "check-config":
        if ns.diff:
            return _diff(*ns.diff)
        if ns.config is None:
            _err("check-config needs a CONFIG (or --diff OLD NEW)")
            return 2
        return _check(ns.config)
    if ns.command in ("reload", "pause", "resume", "switchover", "rollout", "drain"):
        from supervisor import operate

        return int(getattr(operate, ns.command.replace("-", "_"))(ns))
    if ns.command == "status":
        from supervisor import operate

        return int(operate.status(ns))
    if ns.command == "demo":
        from supervisor.demo import run_demo

        return run_demo(ns)
    if ns.command == "metrics-doc":
        from supervisor.metrics import reference_markdown

        print(reference_markdown(), end="")
        return 0
    if ns.command == "dialect-doc":
        from supervisor.backends import Dialect

        print(Dialect.reference_markdown(), end="")
        return 0
    if ns.command == "backends":
        from supervisor.backends import available_backends

        broken = 0
        for name, cls in sorted(available_backends().items()):
            if isinstance(cls, Exception):
                broken += 1
                print(f"{name:10} BROKEN: {cls}")
                continue
            print(
                f"{name:10} {cls.__module__}.{cls.__qualname__}  "
                f"(continuation: {cls.continuation_mode})"
            )
        return 1 if broken else 0
    parser.print_help()
    return 2


def _load(path: Path) -> Any:
    from supervisor.config import ConfigError, load

    try:
        return load(path)
    except ConfigError as e:
        _err(f"invalid config {path}:")
        for p in e.problems:
            print(f"  {p}", file=sys.stderr)
        return None


def _check(path: Path) -> int:
    cfg = _load(path)
    if cfg is None:
        return 2
    from supervisor.config import warnings

    for w in warnings(cfg):
        print(f"warning: {w}", file=sys.stderr)
    shadows = sum(s.shadows for s in cfg.slots)
    print(f"{path}: OK — node {cfg.node}, {len(cfg.slots)} slot(s), {shadows} shadow(s)")
    return 0


def _diff(old_path: Path, new_path: Path) -> int:
    from supervisor import confdiff

    old, new = _load(old_path), _load(new_path)
    if old is None or new is None:
        return 2
    changes = confdiff.diff(old, new)
    if not changes:
        print("no changes")
        return 0
    for c in changes:
        print(c.line())
    rollout = sorted({c.key.split("]")[0][5:] for c in changes if c.effect == confdiff.ROLLOUT})
    restart = [c.key for c in changes if c.effect == confdiff.RESTART]
    if rollout:
        print(f"\nslots to roll out after the reload: {', '.join(rollout)}")
    if restart:
        print(f"needs a restart to take effect: {', '.join(restart)}")
    return 0


def _use_uvloop(choice: str) -> bool:
    if choice == "asyncio":
        return False
    try:
        import uvloop  # noqa: F401
    except ImportError:
        if choice == "uvloop":
            _err("--loop uvloop: uvloop is not installed (pip install uvloop)")
            raise SystemExit(2) from None
        return False
    return True


def _run(path: Path, level: str, loop: str = "auto") -> int:
    import anyio

    from supervisor import log
    from supervisor.daemon import Supervisor

    cfg = _load(path)
    if cfg is None:
        return 2
    from supervisor.config import ConfigError

    log.configure(level)
    try:
        sup = Supervisor(cfg, path)
    except ConfigError as e:
        for p in e.problems:
            _err(p)
        return 2
    # What was loaded so far (modules, config) lives as long as the process: out of the
    # collector's sight, and collections rarer, since the relay allocates per token.
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    uv = _use_uvloop(loop)
    try:
        anyio.run(
            sup.run,
            lambda line: print(line, flush=True),
            backend_options={"use_uvloop": uv},
        )
    except (OSError, ExceptionGroup) as e:
        leaves = _leaf_errors(e)
        if not all(isinstance(x, OSError) for x in leaves):
            raise
        for x in leaves:  # e.g. the admin or frontend port is taken
            _err(f"cannot start: {x}")
        return 1
    return 0


def _leaf_errors(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [leaf for sub in e.exceptions for leaf in _leaf_errors(sub)]
    return [e]
