"""``failover-supervisor`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from supervisor import __version__


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # sim-engine forwards everything to the simulator's own parser (real engines' flags).
    if args and args[0] == "sim-engine":
        from supervisor.testing.simengine import main as sim_main

        return sim_main(args[1:])
    parser = argparse.ArgumentParser(
        prog="failover-supervisor",
        description="Keeps LLM inference engines serving through failures.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("sim-engine", help="run a simulated engine (vllm, sglang, trtllm dialects)")
    demo = sub.add_parser("demo", help="watch a simulated engine stream (no servers needed)")
    demo.add_argument("--dialect", default="vllm", choices=("vllm", "sglang", "trtllm"))
    demo.add_argument("--tokens", type=int, default=40)
    sub.add_parser("backends", help="list the backend plugins found through entry points")
    ns = parser.parse_args(args)
    if ns.command == "demo":
        from supervisor.demo import run_demo

        return run_demo(ns)
    if ns.command == "backends":
        from supervisor.backends import available_backends

        for name, cls in sorted(available_backends().items()):
            print(
                f"{name:10} {cls.__module__}.{cls.__qualname__}  "
                f"(continuation: {cls.continuation_mode})"
            )
        return 0
    parser.print_help()
    return 2
