"""What a simulated engine is told: its dialect's facts, its options and fault knobs, and
its log (engine-style lines on stderr).

Shared by the engine model (:mod:`supervisor.testing.simengine`), its HTTP API
(:mod:`supervisor.testing.simhttp`) and its command line (:mod:`supervisor.testing.simcli`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from supervisor.backends import Dialect
from supervisor.testing.gpuledger import DEFAULT_CAPACITY_GIB, default_ledger_path

DIALECTS = ("vllm", "sglang", "trtllm", "vllm-gms", "sglang-gms")


def dialect_facts(name: str) -> Dialect:
    """The dialect facts of the first-party plugin for ``name`` (one source of truth)."""
    if name == "vllm":
        from plugins.vllm import DIALECT
    elif name == "sglang":
        from plugins.sglang import DIALECT
    elif name == "trtllm":
        from plugins.trtllm import DIALECT
    elif name == "vllm-gms":
        from plugins.dynamo_gms import VLLM_GMS as DIALECT
    elif name == "sglang-gms":
        from plugins.dynamo_gms import SGLANG_GMS as DIALECT
    else:
        raise ValueError(f"unknown dialect {name!r}; choose one of {', '.join(DIALECTS)}")
    return DIALECT


@dataclass
class Faults:
    """Fault knobs; token counts are over all requests since the fault was set."""

    exit_after_tokens: int | None = None  # the process exits with status 1
    kill_after_tokens: int | None = None  # the API server SIGKILLs itself
    hang_after_tokens: int | None = None  # generation stops; /health still answers
    # One request stops after this many of its own tokens (the first to get there); the
    # engine serves every other request: a stall that is not the engine's.
    stall_one_request_after: int | None = None
    malformed_after_tokens: int | None = None  # a stream gets a garbage event, then ends
    # A stream gets an event line that never ends: bytes with no blank line after them, as
    # fast as the client reads (or 1 KiB every endless_event_pace seconds), until it hangs up.
    endless_event_after_tokens: int | None = None
    endless_event_pace: float | None = None
    # The engine core dies, the API server lives on (vLLM's EngineDeadError): streams in
    # flight get an error event then [DONE], /health answers 503, new requests 500.
    core_dead_after_tokens: int | None = None
    fail_health: bool = False  # /health answers 503
    error_500: bool = False  # inference routes answer 500
    gpu_lost: bool = False  # the GPU fell off the bus: generation and /health hang
    # /health answers only after this many seconds; generation goes on (an API server too
    # busy to answer a health check promptly, as under a flood of streams)
    slow_health: float | None = None

    def update(self, values: dict[str, Any]) -> None:
        names = {f.name for f in fields(self)}
        for key, value in values.items():
            if key not in names:
                raise ValueError(f"unknown fault {key!r}; known: {', '.join(sorted(names))}")
            if key in ("fail_health", "error_500", "gpu_lost"):
                if not isinstance(value, bool):
                    raise ValueError(f"fault {key!r} takes true or false")
            elif key in ("slow_health", "endless_event_pace"):
                if value is not None and (
                    not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0
                ):
                    raise ValueError(f"fault {key!r} takes seconds >= 0 or null")
            elif value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"fault {key!r} takes a token count >= 0 or null")
            setattr(self, key, value)


@dataclass
class SimOptions:
    dialect: str
    model: str = "sim-model"
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str | None = None
    sleep_enabled: bool = False
    metrics_enabled: bool = True
    incremental_stream: bool = False
    stream_interval: int = 1  # tokens per streamed event (SGLang's --stream-interval)
    # With a reasoning parser, a chat answer opens with REASONING_TOKENS of reasoning; with a
    # tool parser (vLLM: and --enable-auto-tool-choice), a chat request with tools is
    # answered by a call of its first tool.
    reasoning_parser: str | None = None
    tool_parser: str | None = None
    # A Dynamo worker run by the standalone GMS recipe: control routes under
    # /engine/control/ ({sleep,wake_up}) instead of the worker's /engine/{sleep,wake_up}.
    gms_control_routes: bool = False
    max_num_seqs: int = 256
    max_model_len: int = 4096
    load_time: float = 0.3
    ttft: float = 0.02
    itl: float = 0.01
    sleep_time: float = 0.05
    wake_time: float = 0.1
    weights_gib: float = 16.0
    kv_gib: float = 48.0
    gpu_capacity_gib: float = DEFAULT_CAPACITY_GIB
    gpus: tuple[str, ...] = ("0",)
    ledger: Path = field(default_factory=default_ledger_path)
    release_delay: float = 0.2
    eos_every: int = 0
    drain_timeout: float = 5.0
    start_asleep: bool = False
    cuda_gib: float = 0.0  # real GPU memory the worker holds (torch), for GPU tests
    # Disaggregated serving: "prefill" engines serve /sim/prefill for "decode" engines,
    # which send every request's prefill to ``prefill_url`` before generating.
    disagg: str = ""
    prefill_url: str = ""
    prefill_per_token: float = 0.0005
    faults: Faults = field(default_factory=Faults)

    @property
    def name(self) -> str:
        return self.served_model_name or self.model


class SimLog:
    """Engine-style log lines on stderr (the supervisor captures them per engine)."""

    def __init__(self, dialect: str) -> None:
        self.tag = dialect

    def info(self, msg: str) -> None:
        stamp = time.strftime("%m-%d %H:%M:%S")
        sys.stderr.write(f"INFO {stamp} [sim-{self.tag}] {msg}\n")
        sys.stderr.flush()

    def error(self, msg: str) -> None:
        stamp = time.strftime("%m-%d %H:%M:%S")
        sys.stderr.write(f"ERROR {stamp} [sim-{self.tag}] {msg}\n")
        sys.stderr.flush()
