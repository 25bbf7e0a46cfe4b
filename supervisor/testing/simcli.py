"""The simulated engine's command line: ``failover-supervisor sim-engine --dialect NAME``.

It takes the real engine's own flags (names from the dialect's plugin) plus ``--sim-*``
knobs, builds :class:`~supervisor.testing.simoptions.SimOptions` and serves the engine
(:func:`supervisor.testing.simhttp.serve`) until SIGTERM. It lives apart from the engine
model so that the model never imports its own HTTP API.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Sequence
from pathlib import Path

from supervisor.testing.gpuledger import DEFAULT_CAPACITY_GIB, default_ledger_path
from supervisor.testing.simhttp import serve
from supervisor.testing.simoptions import DIALECTS, Faults, SimOptions, dialect_facts


def build_parser(dialect: str) -> argparse.ArgumentParser:
    """The real engine's flags for ``dialect`` (names from its plugin) plus ``--sim-*``."""
    d = dialect_facts(dialect)
    p = argparse.ArgumentParser(
        prog=f"failover-supervisor sim-engine --dialect {dialect}",
        description=f"Simulated {dialect} engine (takes {' '.join(d.program)}'s own flags).",
    )
    if d.model_flag:
        p.add_argument(d.model_flag, dest="model", default="sim-model")
    else:
        p.add_argument("model", nargs="?", default="sim-model")
        p.add_argument("--model", dest="model_opt", default=None, help=argparse.SUPPRESS)
    p.add_argument(d.host_flag, dest="host", default="127.0.0.1")
    p.add_argument(d.port_flag, dest="port", type=int, default=d.default_port)
    p.add_argument(d.served_name_flag, dest="served_model_name", default=None)
    if d.sleep_flag:
        p.add_argument(d.sleep_flag, dest="sleep_enabled", action="store_true")
    if d.max_seqs_flag:
        p.add_argument(d.max_seqs_flag, dest="max_num_seqs", type=int, default=256)
    if d.start_asleep_flag:
        # e.g. the Dynamo worker's "--gms-mode shadow": load, then sleep (as --sim-start-asleep)
        p.add_argument(d.start_asleep_flag[0], dest="start_mode", default=None)
    if d.base == "vllm":
        p.add_argument("--max-model-len", dest="max_model_len", type=int, default=4096)
        for flag in (
            "--gpu-memory-utilization",
            "--tensor-parallel-size",
            "--load-format",
            "--dtype",
            "--quantization",
            "--seed",
            "--max-num-batched-tokens",
        ):
            p.add_argument(flag, help="accepted for compatibility; no effect")
        for flag in (
            "--enforce-eager",
            "--disable-log-requests",
            "--enable-log-requests",
            "--no-enable-log-requests",
        ):
            p.add_argument(flag, action="store_true", help="accepted; no effect")
        p.add_argument("--reasoning-parser", dest="reasoning_parser", default=None)
        p.add_argument("--tool-call-parser", dest="tool_parser", default=None)
        p.add_argument("--enable-auto-tool-choice", dest="auto_tools", action="store_true")
    elif d.base == "sglang":
        p.add_argument("--context-length", dest="max_model_len", type=int, default=4096)
        p.add_argument("--enable-metrics", dest="metrics_enabled", action="store_true")
        p.add_argument(
            "--incremental-streaming-output", dest="incremental_stream", action="store_true"
        )
        p.add_argument("--stream-interval", dest="stream_interval", type=int, default=1)
        p.add_argument("--reasoning-parser", dest="reasoning_parser", default=None)
        p.add_argument("--tool-call-parser", dest="tool_parser", default=None)
        p.add_argument("--random-seed", help="accepted for compatibility; no effect")
        for flag in ("--mem-fraction-static", "--tp-size", "--dtype", "--load-format"):
            p.add_argument(flag, help="accepted for compatibility; no effect")
    else:
        p.add_argument("--max_seq_len", dest="max_model_len", type=int, default=4096)
        p.add_argument("--reasoning_parser", dest="reasoning_parser", default=None)
        p.add_argument("--tool_parser", dest="tool_parser", default=None)
        for flag in (
            "--backend",
            "--tp_size",
            "--kv_cache_free_gpu_memory_fraction",
        ):
            p.add_argument(flag, help="accepted for compatibility; no effect")
    s = p.add_argument_group("simulator")
    s.add_argument("--sim-load-time", type=float, default=0.3, help="seconds to load (0.3)")
    s.add_argument("--sim-ttft", type=float, default=0.02, help="time to first token (0.02)")
    s.add_argument("--sim-itl", type=float, default=0.01, help="inter-token latency (0.01)")
    s.add_argument("--sim-sleep-time", type=float, default=0.05, help="seconds to sleep (0.05)")
    s.add_argument("--sim-wake-time", type=float, default=0.1, help="seconds to wake (0.1)")
    s.add_argument("--sim-weights-gib", type=float, default=16.0, help="weights per GPU (16)")
    s.add_argument("--sim-kv-gib", type=float, default=48.0, help="KV cache per GPU (48)")
    s.add_argument(
        "--sim-gpu-capacity-gib",
        type=float,
        default=DEFAULT_CAPACITY_GIB,
        help="capacity of each simulated GPU, set by the first engine (80)",
    )
    s.add_argument(
        "--sim-ledger",
        type=Path,
        default=None,
        help="GPU ledger file ($FAILOVER_SIM_LEDGER or a file in the temp dir)",
    )
    s.add_argument(
        "--sim-release-delay",
        type=float,
        default=0.2,
        help="seconds the worker outlives the API server (0.2)",
    )
    s.add_argument(
        "--sim-eos-every",
        type=int,
        default=0,
        help="end a sequence with EOS about once in N tokens (0: never)",
    )
    s.add_argument(
        "--sim-drain-timeout",
        type=float,
        default=5.0,
        help="on SIGTERM, seconds in-flight requests may finish in (5)",
    )
    s.add_argument(
        "--sim-start-asleep",
        action="store_true",
        help="load weights only and start asleep, as a GPU Memory Service shadow "
        "does (needs the dialect's sleep flag to wake)",
    )
    s.add_argument(
        "--sim-disagg",
        choices=("prefill", "decode"),
        default="",
        help="disaggregated serving: a prefill engine serves /sim/prefill; a decode engine "
        "sends each request's prefill to --sim-prefill-url first",
    )
    s.add_argument(
        "--sim-cuda-gib",
        type=float,
        default=0.0,
        help="the worker also holds this much real GPU memory (needs torch with CUDA); "
        "SIGUSR1 to the worker checks it (0: none)",
    )
    s.add_argument("--sim-prefill-url", default="", help="the prefill engine (decode only)")
    s.add_argument(
        "--sim-gms-control-routes",
        action="store_true",
        help="Dynamo worker dialects: serve the standalone GMS recipe's control routes "
        "(/engine/control/sleep, /engine/control/wake_up) instead of /engine/sleep, ...",
    )
    s.add_argument(
        "--sim-prefill-per-token",
        type=float,
        default=0.0005,
        help="prefill seconds per prompt token (0.0005)",
    )
    s.add_argument("--sim-exit-after-tokens", type=int, default=None)
    s.add_argument("--sim-kill-after-tokens", type=int, default=None)
    s.add_argument("--sim-hang-after-tokens", type=int, default=None)
    s.add_argument("--sim-malformed-after-tokens", type=int, default=None)
    s.add_argument("--sim-endless-event-after-tokens", type=int, default=None)
    s.add_argument("--sim-endless-event-pace", type=float, default=None, metavar="SECONDS")
    s.add_argument("--sim-stall-one-request-after", type=int, default=None)
    s.add_argument("--sim-core-dead-after-tokens", type=int, default=None)
    s.add_argument("--sim-fail-health", action="store_true")
    s.add_argument("--sim-slow-health", type=float, default=None, metavar="SECONDS")
    s.add_argument("--sim-error-500", action="store_true")
    return p


def parse_options(dialect: str, argv: Sequence[str]) -> SimOptions:
    ns = build_parser(dialect).parse_args(list(argv))
    model = getattr(ns, "model_opt", None) or ns.model
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip()
    gpus = tuple(g.strip() for g in visible.split(",") if g.strip()) or ("0",)
    if ns.sim_disagg == "decode" and not ns.sim_prefill_url:
        raise SystemExit("--sim-disagg decode needs --sim-prefill-url (the prefill engine)")
    faults = Faults(
        exit_after_tokens=ns.sim_exit_after_tokens,
        kill_after_tokens=ns.sim_kill_after_tokens,
        hang_after_tokens=ns.sim_hang_after_tokens,
        malformed_after_tokens=ns.sim_malformed_after_tokens,
        endless_event_after_tokens=ns.sim_endless_event_after_tokens,
        endless_event_pace=ns.sim_endless_event_pace,
        stall_one_request_after=ns.sim_stall_one_request_after,
        core_dead_after_tokens=ns.sim_core_dead_after_tokens,
        fail_health=ns.sim_fail_health,
        slow_health=ns.sim_slow_health,
        error_500=ns.sim_error_500,
    )
    return SimOptions(
        dialect=dialect,
        model=model,
        host=ns.host,
        port=ns.port,
        served_model_name=ns.served_model_name,
        sleep_enabled=getattr(ns, "sleep_enabled", False),
        # vLLM and TRT-LLM always serve /metrics; SGLang only with --enable-metrics.
        metrics_enabled=getattr(ns, "metrics_enabled", True),
        incremental_stream=getattr(ns, "incremental_stream", False),
        stream_interval=max(getattr(ns, "stream_interval", 1), 1),
        reasoning_parser=ns.reasoning_parser,
        tool_parser=ns.tool_parser
        if getattr(ns, "auto_tools", True) or dialect_facts(dialect).base != "vllm"
        else None,
        max_num_seqs=getattr(ns, "max_num_seqs", 256),
        max_model_len=ns.max_model_len,
        load_time=ns.sim_load_time,
        ttft=ns.sim_ttft,
        itl=ns.sim_itl,
        sleep_time=ns.sim_sleep_time,
        wake_time=ns.sim_wake_time,
        weights_gib=ns.sim_weights_gib,
        kv_gib=ns.sim_kv_gib,
        gpu_capacity_gib=ns.sim_gpu_capacity_gib,
        gpus=gpus,
        ledger=ns.sim_ledger or default_ledger_path(),
        release_delay=ns.sim_release_delay,
        eos_every=ns.sim_eos_every,
        drain_timeout=ns.sim_drain_timeout,
        start_asleep=ns.sim_start_asleep
        or (
            bool(dialect_facts(dialect).start_asleep_flag)
            and getattr(ns, "start_mode", None) == dialect_facts(dialect).start_asleep_flag[-1]
        ),
        disagg=ns.sim_disagg,
        prefill_url=ns.sim_prefill_url if ns.sim_disagg == "decode" else "",
        prefill_per_token=ns.sim_prefill_per_token,
        cuda_gib=ns.sim_cuda_gib,
        gms_control_routes=ns.sim_gms_control_routes,
        faults=faults,
    )


def main(argv: Sequence[str]) -> int:
    """Entry of ``failover-supervisor sim-engine``; ``argv`` starts with ``--dialect NAME``."""
    args = list(argv)
    pre = argparse.ArgumentParser(prog="failover-supervisor sim-engine", add_help=False)
    pre.add_argument("--dialect", choices=DIALECTS)
    known, rest = pre.parse_known_args(args)
    if known.dialect is None:
        if "-h" in rest or "--help" in rest:
            print(
                "usage: failover-supervisor sim-engine --dialect {vllm,sglang,trtllm} "
                "[engine flags] [--sim-* flags]\n"
                "Run with --dialect NAME --help for that dialect's flags."
            )
            return 0
        pre.error("--dialect is required (vllm, sglang or trtllm)")
    opts = parse_options(known.dialect, rest)
    try:
        return asyncio.run(serve(opts))
    except KeyboardInterrupt:
        return 130
