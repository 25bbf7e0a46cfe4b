"""GPU fault signals as a health source: XID events from the kernel log, NVML readings.

An engine on a GPU that fell off the bus (XID 79) or hit an uncontained ECC error (XID 95)
often does not exit: it hangs, or answers health checks while every request times out. The
driver says so in the kernel log at once. :class:`GpuWatcher` reads those lines (from
``/dev/kmsg``, ``journalctl -k -f``, or any file it follows: tests and simulators append
real-format lines to one) and classifies each XID with :data:`XID_TABLE`: ``failover``
events make health declare every engine on that GPU dead at once, and the GPU is marked
broken so no shadow on it is woken; ``watch`` and ``info`` events are counted only.
NVML readings (through ``nvidia-ml-py`` when installed, or a JSON file of readings) export
memory, ECC and throttling as metrics; only a GPU that NVML reports lost causes a failover.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import anyio

from supervisor import log as logging
from supervisor.configschema import GpuConfig
from supervisor.metrics import Metrics


class XidAction(StrEnum):
    FAILOVER = "failover"  # the GPU cannot serve: fail over its engines now
    WATCH = "watch"  # often an application fault; counted, the engine's own health decides
    INFO = "info"  # informational


# XID -> (action, meaning). Actions follow NVIDIA's Xid catalog resolution buckets: a GPU
# reset or service is needed (failover), or an application restart at most (watch).
XID_TABLE: dict[int, tuple[XidAction, str]] = {
    13: (XidAction.WATCH, "graphics engine exception (usually the application)"),
    31: (XidAction.WATCH, "GPU memory page fault (usually the application)"),
    43: (XidAction.WATCH, "GPU stopped processing: a channel was reset (application error)"),
    45: (XidAction.INFO, "preemptive cleanup after earlier errors"),
    46: (XidAction.FAILOVER, "GPU stopped processing"),
    48: (XidAction.FAILOVER, "double-bit ECC error (DBE)"),
    61: (XidAction.WATCH, "internal micro-controller breakpoint/warning"),
    62: (XidAction.FAILOVER, "internal micro-controller halt"),
    63: (XidAction.WATCH, "ECC page retirement or row remapping recorded"),
    64: (XidAction.FAILOVER, "ECC page retirement or row remapping failure"),
    74: (XidAction.FAILOVER, "NVLink error"),
    79: (XidAction.FAILOVER, "GPU has fallen off the bus"),
    92: (XidAction.WATCH, "high single-bit ECC error rate"),
    94: (XidAction.FAILOVER, "contained ECC error (the affected application must restart)"),
    95: (XidAction.FAILOVER, "uncontained ECC error"),
    119: (XidAction.FAILOVER, "GSP RPC timeout"),
    120: (XidAction.FAILOVER, "GSP error"),
    140: (XidAction.FAILOVER, "unrecovered ECC error"),
    154: (XidAction.INFO, "GPU recovery action changed"),
}

# "NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python, GPU has fallen off the bus."
_XID_RE = re.compile(
    r"NVRM: Xid \(PCI:(?P<pci>[0-9A-Fa-f]{1,8}:[0-9A-Fa-f]{2}:[0-9A-Fa-f]{2}(?:\.[0-7])?)\):"
    r"\s*(?P<xid>\d+),?\s*(?P<detail>.*)$"
)


def classify(xid: int) -> tuple[XidAction, str]:
    return XID_TABLE.get(xid, (XidAction.WATCH, "not in the table (see NVIDIA's Xid catalog)"))


def normalize_pci(bus_id: str) -> str:
    """``00000000:3B:00.0`` (NVML) and ``0000:3b:00`` (kernel log) -> ``0000:3b:00``."""
    bus_id = bus_id.strip().lower()
    bus_id = bus_id.split(".")[0]
    parts = bus_id.split(":")
    if len(parts) == 2:
        parts = ["0", *parts]
    domain, bus, dev = parts[-3:]
    return f"{int(domain, 16):04x}:{int(bus, 16):02x}:{int(dev, 16):02x}"


@dataclass(frozen=True)
class XidEvent:
    pci: str
    xid: int
    detail: str
    action: XidAction
    meaning: str
    raw: str


def parse_kernel_line(line: str) -> XidEvent | None:
    """An XID event from one kernel log line (``/dev/kmsg`` record, journal or dmesg)."""
    if ";" in line and line.split(";", 1)[0].count(",") >= 3:  # kmsg: "6,1234,567,-;msg"
        line = line.split(";", 1)[1]
    m = _XID_RE.search(line.strip())
    if m is None:
        return None
    xid = int(m.group("xid"))
    action, meaning = classify(xid)
    return XidEvent(
        normalize_pci(m.group("pci")), xid, m.group("detail").strip(), action, meaning, line.strip()
    )


# -- kernel log sources ----------------------------------------------------------------------
def _read_from(path: Path, pos: int) -> tuple[int, bytes]:
    """Bytes appended to ``path`` since ``pos`` (from 0 again if it was truncated)."""
    size = path.stat().st_size
    if size < pos:
        pos = 0
    if size == pos:
        return pos, b""
    with path.open("rb") as f:
        f.seek(pos)
        data = f.read()
    return pos + len(data), data


def _start_of_follow(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path.stat().st_size


async def follow_file(path: Path, interval: float = 0.05) -> AsyncIterator[str]:
    """New lines appended to ``path`` (created if missing), from its current end."""
    pos = await anyio.to_thread.run_sync(_start_of_follow, path)
    buf = ""
    while True:
        pos, data = await anyio.to_thread.run_sync(_read_from, path, pos)
        if data:
            buf += data.decode("utf-8", "replace")
            *lines, buf = buf.split("\n")
            for line in lines:
                yield line
        await anyio.sleep(interval)


async def follow_kmsg(path: str = "/dev/kmsg") -> AsyncIterator[str]:
    """Kernel log records from ``/dev/kmsg``, new ones only, without blocking the loop."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        os.lseek(fd, 0, os.SEEK_END)
        while True:
            await anyio.wait_readable(fd)
            try:
                record = os.read(fd, 8192)
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno == errno.EPIPE:  # records were overwritten before we read them
                    continue
                raise
            yield record.decode("utf-8", "replace").rstrip("\n")
    finally:
        os.close(fd)


async def follow_journal() -> AsyncIterator[str]:
    """Kernel messages from ``journalctl -k -f``."""
    async with await anyio.open_process(["journalctl", "-k", "-f", "-n", "0", "-o", "cat"]) as proc:
        assert proc.stdout is not None
        buf = b""
        async for chunk in proc.stdout:
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                yield line.decode("utf-8", "replace")


# -- NVML ------------------------------------------------------------------------------------
THROTTLE_REASONS = {  # nvmlClocksEventReason* bits
    0x1: "gpu_idle",
    0x2: "applications_clocks",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal",
    0x40: "hw_thermal",
    0x80: "hw_power_brake",
    0x100: "display_clocks",
}


@dataclass
class GpuReading:
    """One GPU's NVML reading (or a simulated one with the same fields)."""

    gpu: str
    pci: str
    name: str = ""
    memory_used: int = 0
    memory_total: int = 0
    ecc_uncorrected: int = 0
    pages_pending: bool = False
    throttle_reasons: list[str] = field(default_factory=list)
    lost: bool = False


class NvmlUnavailable(RuntimeError):
    pass


class NvmlReader:
    """Readings from the real driver through ``pynvml`` (package ``nvidia-ml-py``)."""

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as e:
            raise NvmlUnavailable("nvidia-ml-py is not installed") from e
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            raise NvmlUnavailable(f"NVML cannot start: {e}") from e
        self.nvml = pynvml

    def read(self) -> list[GpuReading]:
        n = self.nvml
        out = []
        for i in range(n.nvmlDeviceGetCount()):
            r = GpuReading(gpu=str(i), pci="")
            try:
                h = n.nvmlDeviceGetHandleByIndex(i)
                pci = n.nvmlDeviceGetPciInfo(h).busId
                r.pci = normalize_pci(pci.decode() if isinstance(pci, bytes) else pci)
                name = n.nvmlDeviceGetName(h)
                r.name = name.decode() if isinstance(name, bytes) else name
                mem = n.nvmlDeviceGetMemoryInfo(h)
                r.memory_used, r.memory_total = int(mem.used), int(mem.total)
                # "Throttle reasons" were renamed "event reasons" in newer nvidia-ml-py.
                get_reasons = (
                    getattr(n, "nvmlDeviceGetCurrentClocksEventReasons", None)
                    or n.nvmlDeviceGetCurrentClocksThrottleReasons
                )
                reasons = get_reasons(h)
                r.throttle_reasons = [v for k, v in THROTTLE_REASONS.items() if reasons & k]
                with contextlib.suppress(n.NVMLError):  # ECC off or unsupported
                    r.ecc_uncorrected = int(
                        n.nvmlDeviceGetTotalEccErrors(
                            h, n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, n.NVML_VOLATILE_ECC
                        )
                    )
                with contextlib.suppress(n.NVMLError):
                    r.pages_pending = bool(n.nvmlDeviceGetRetiredPagesPendingStatus(h))
            except n.NVMLError as e:
                if "lost" in str(e).lower():
                    r.lost = True
                else:
                    raise
            out.append(r)
        return out


class JsonReadings:
    """Readings from a JSON file (a list of :class:`GpuReading` fields): for tests and
    simulators, which can rewrite the file to change what the watcher sees."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> list[GpuReading]:
        try:
            data = json.loads(self.path.read_text() or "[]")
        except FileNotFoundError:
            return []
        return [GpuReading(**{**d, "pci": normalize_pci(d["pci"])}) for d in data]


# -- the watcher -----------------------------------------------------------------------------
FatalCallback = Callable[[str, str, float], Awaitable[None]]


class GpuWatcher:
    """Turns kernel-log XIDs and NVML readings into metrics and, when fatal, failovers."""

    def __init__(
        self,
        metrics: Metrics,
        on_fatal: FatalCallback,
        *,
        pci_map: dict[str, str] | None = None,
        lines: Callable[[], AsyncIterator[str]] | None = None,
        readings: NvmlReader | JsonReadings | None = None,
        poll_interval: float = 5.0,
        gpus: Sequence[str] = (),
    ) -> None:
        self.metrics = metrics
        self.gpus = tuple(gpus)  # the GPUs engines run on (as configured)
        self.on_fatal = on_fatal
        self.pci_to_gpu = {normalize_pci(p): g for g, p in (pci_map or {}).items()}
        self.lines = lines
        self.readings = readings
        self.poll_interval = poll_interval
        self.broken: dict[str, str] = {}  # GPU id -> why
        self.log = logging.get(component="gpu")

    def gpu_of(self, pci: str) -> str | None:
        return self.pci_to_gpu.get(pci)

    async def run(self) -> None:
        if self.lines is not None:
            # The kernel log is a source of its own: the GPUs it watches are healthy until it
            # says otherwise (NVML, where it reads, says so too).
            for gpu in dict.fromkeys([*self.gpus, *self.pci_to_gpu.values()]):
                if gpu not in self.broken:
                    self.metrics.gpu_healthy.labels(gpu).set(1)
        async with anyio.create_task_group() as tg:
            if self.readings is not None:
                tg.start_soon(self._poll)
            if self.lines is not None:
                tg.start_soon(self._follow)

    async def _follow(self) -> None:
        assert self.lines is not None
        async for line in self.lines():
            await self.handle_line(line)

    async def handle_line(self, line: str) -> XidEvent | None:
        ev = parse_kernel_line(line)
        if ev is None:
            return None
        at = time.time()
        gpu = self.gpu_of(ev.pci)
        label = gpu if gpu is not None else ev.pci
        self.metrics.gpu_xid_events.labels(label, str(ev.xid), ev.action.value).inc()
        self.log.warning(
            "GPU XID event",
            gpu=gpu,
            pci=ev.pci,
            xid=ev.xid,
            action=ev.action.value,
            meaning=ev.meaning,
            detail=ev.detail,
        )
        if ev.action is XidAction.FAILOVER:
            if gpu is None:
                self.log.error(
                    "fatal XID on a GPU we cannot map to an engine; set "
                    "[gpu] pci or install nvidia-ml-py",
                    pci=ev.pci,
                    xid=ev.xid,
                )
                return ev
            await self.mark_broken(
                gpu, f"XID {ev.xid} ({ev.meaning}) on GPU {gpu} (PCI {ev.pci})", at
            )
        return ev

    async def mark_broken(self, gpu: str, reason: str, at: float) -> None:
        first = gpu not in self.broken
        self.broken.setdefault(gpu, reason)
        self.metrics.gpu_healthy.labels(gpu).set(0)
        if first:
            self.log.error("GPU marked broken: failing over its engines", gpu=gpu, reason=reason)
        await self.on_fatal(gpu, reason, at)

    def clear(self, gpu: str) -> bool:
        """An operator says the GPU was reset or replaced."""
        if self.broken.pop(gpu, None) is None:
            return False
        self.metrics.gpu_healthy.labels(gpu).set(1)
        self.log.info("GPU cleared by an operator", gpu=gpu)
        return True

    async def _poll(self) -> None:
        assert self.readings is not None
        while True:
            try:
                readings = await anyio.to_thread.run_sync(self.readings.read)
            except Exception as e:  # a driver hiccup must not stop the watcher
                self.log.warning("GPU readings failed", error=repr(e))
                readings = []
            for r in readings:
                await self._apply(r)
            await anyio.sleep(self.poll_interval)

    async def _apply(self, r: GpuReading) -> None:
        if r.pci:
            self.pci_to_gpu.setdefault(r.pci, r.gpu)
        m = self.metrics
        m.gpu_memory_used.labels(r.gpu).set(r.memory_used)
        m.gpu_memory_total.labels(r.gpu).set(r.memory_total)
        m.gpu_ecc_uncorrected.labels(r.gpu).set(r.ecc_uncorrected)
        m.gpu_pages_pending.labels(r.gpu).set(1 if r.pages_pending else 0)
        for reason in THROTTLE_REASONS.values():
            m.gpu_throttled.labels(r.gpu, reason).set(1 if reason in r.throttle_reasons else 0)
        if r.lost:
            await self.mark_broken(r.gpu, f"NVML reports GPU {r.gpu} lost", time.time())
        elif r.gpu not in self.broken:
            m.gpu_healthy.labels(r.gpu).set(1)

    def snapshot(self) -> dict[str, Any]:
        return {"broken": dict(self.broken), "pci": dict(self.pci_to_gpu)}


def _readable(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
        return True
    except OSError:
        return False


def watcher_for(
    g: GpuConfig,
    gpus: list[str],
    metrics: Metrics,
    on_fatal: Callable[[str, str, float], Awaitable[None]],
    log: Any,
) -> GpuWatcher:
    """The watcher the ``[gpu]`` table asks for: kernel-log XIDs from ``/dev/kmsg`` (when
    readable), the journal or a file, and NVML (or a JSON file of readings) where asked.
    NvmlUnavailable when ``nvml = "on"`` and NVML cannot be opened."""
    lines: Any = None
    if g.xid_source == "kmsg" or (g.xid_source == "auto" and _readable("/dev/kmsg")):
        lines = follow_kmsg
    elif g.xid_source == "journal":
        lines = follow_journal
    elif g.xid_source not in ("auto", "none", "off"):
        path = Path(g.xid_source)
        lines = lambda: follow_file(path)  # noqa: E731
    readings: Any = None
    if g.nvml in ("auto", "on"):
        try:
            readings = NvmlReader()
        except NvmlUnavailable as e:
            if g.nvml == "on":
                raise
            log.info("NVML readings off", reason=str(e))
    elif g.nvml != "off":
        readings = JsonReadings(Path(g.nvml))
    return GpuWatcher(
        metrics,
        on_fatal,
        pci_map=g.pci,
        lines=lines,
        readings=readings,
        poll_interval=g.poll_interval,
        gpus=gpus,
    )
