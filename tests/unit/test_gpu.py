import json
from pathlib import Path

import anyio
import pytest
from prometheus_client import generate_latest

from supervisor.gpu import (
    XID_TABLE,
    GpuWatcher,
    JsonReadings,
    XidAction,
    follow_file,
    normalize_pci,
    parse_kernel_line,
)
from supervisor.metrics import Metrics


@pytest.mark.parametrize(
    ("line", "pci", "xid", "action"),
    [
        (
            "4,1234,5678901,-;NVRM: Xid (PCI:0000:3b:00): 79, pid=1234, name=python3, "
            "GPU has fallen off the bus.",
            "0000:3b:00",
            79,
            XidAction.FAILOVER,
        ),
        (
            "Nov 23 01:02:03 gpu7 kernel: NVRM: Xid (PCI:0000:10:1c): 63, pid=1896, Row "
            "Remapper: New row marked for remapping, reset gpu to activate.",
            "0000:10:1c",
            63,
            XidAction.WATCH,
        ),
        (
            "[ 1234.567890] NVRM: Xid (PCI:0000:3B:00): 43, pid=2211, name=vllm, Ch 00000008",
            "0000:3b:00",
            43,
            XidAction.WATCH,
        ),
        (
            "NVRM: Xid (PCI:0000:86:00): 95, pid='<unknown>', name=<unknown>, Uncontained: "
            "FBHUB. RST: Yes, D-RST: No",
            "0000:86:00",
            95,
            XidAction.FAILOVER,
        ),
        ("NVRM: Xid (PCI:0000:86:00): 999, something new", "0000:86:00", 999, XidAction.WATCH),
    ],
)
def test_kernel_log_lines_parse(line: str, pci: str, xid: int, action: XidAction) -> None:
    ev = parse_kernel_line(line)
    assert ev is not None
    assert (ev.pci, ev.xid, ev.action) == (pci, xid, action)


@pytest.mark.parametrize(
    "line",
    [
        "",
        "usb 1-1: new device",
        "NVRM: Xid (PCI:zz): 79, x",
        "NVRM: loading NVIDIA UNIX x86_64 Kernel Module 580.65",
    ],
)
def test_other_lines_are_ignored(line: str) -> None:
    assert parse_kernel_line(line) is None


def test_pci_ids_from_nvml_and_kernel_log_match() -> None:
    assert normalize_pci("00000000:3B:00.0") == normalize_pci("0000:3b:00") == "0000:3b:00"
    assert normalize_pci("3b:00.0") == "0000:3b:00"


def test_table_has_the_fatal_xids_and_43_is_not_fatal() -> None:
    for xid in (48, 74, 79, 94, 95, 119, 120):
        assert XID_TABLE[xid][0] is XidAction.FAILOVER
    assert XID_TABLE[43][0] is XidAction.WATCH


@pytest.mark.anyio
async def test_watcher_metrics_and_fatal_events(tmp_path: Path) -> None:
    metrics = Metrics()
    fatal: list[tuple[str, str]] = []

    async def on_fatal(gpu: str, reason: str, at: float) -> None:
        fatal.append((gpu, reason))

    readings = tmp_path / "nvml.json"
    readings.write_text(
        json.dumps(
            [
                {
                    "gpu": "0",
                    "pci": "00000000:3B:00.0",
                    "memory_used": 7,
                    "memory_total": 80,
                    "throttle_reasons": ["hw_thermal"],
                    "ecc_uncorrected": 2,
                },
                {"gpu": "1", "pci": "00000000:86:00.0", "lost": True},
            ]
        )
    )
    w = GpuWatcher(metrics, on_fatal, readings=JsonReadings(readings))
    for r in w.readings.read():  # type: ignore[union-attr]
        await w._apply(r)
    text = generate_latest(metrics.registry).decode()
    assert 'failover_supervisor_gpu_memory_used_bytes{gpu="0"} 7.0' in text
    assert 'failover_supervisor_gpu_throttled{gpu="0",reason="hw_thermal"} 1.0' in text
    assert 'failover_supervisor_gpu_ecc_uncorrected_errors{gpu="0"} 2.0' in text
    assert fatal == [("1", "NVML reports GPU 1 lost")]
    # The PCI map learned from NVML maps kernel-log XIDs to GPU ids.
    await w.handle_line("NVRM: Xid (PCI:0000:3b:00): 43, pid=1, Ch 1")
    assert len(fatal) == 1  # 43 is counted, not fatal
    await w.handle_line("NVRM: Xid (PCI:0000:3b:00): 48, pid=1, DBE")
    assert fatal[-1][0] == "0" and "XID 48" in fatal[-1][1]
    text = generate_latest(metrics.registry).decode()
    assert 'failover_supervisor_gpu_xid_events_total{action="watch",gpu="0",xid="43"} 1.0' in text
    assert 'failover_supervisor_gpu_healthy{gpu="0"} 0.0' in text
    assert w.clear("0") and not w.clear("0")


@pytest.mark.anyio
async def test_follow_file_yields_appended_lines(tmp_path: Path) -> None:
    path = tmp_path / "kern.log"
    path.write_text("old line\n")
    got: list[str] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:

            async def read() -> None:
                async for line in follow_file(path, interval=0.01):
                    got.append(line)
                    if len(got) == 2:
                        tg.cancel_scope.cancel()

            tg.start_soon(read)
            await anyio.sleep(0.1)
            with path.open("a") as f:
                f.write("first\nsec")
            await anyio.sleep(0.1)
            with path.open("a") as f:
                f.write("ond\n")
    assert got == ["first", "second"]


def test_docs_table_matches_the_code() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "gpu.md").read_text()
    for xid, (action, meaning) in XID_TABLE.items():
        assert f"| {xid} | {action.value} | {meaning} |" in doc, xid
