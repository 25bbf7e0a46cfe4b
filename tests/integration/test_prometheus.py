"""Prometheus for real: promtool on the shipped rules, and a Prometheus server scraping a
running supervisor through a failover."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import anyio
import pytest

from supervisor.metrics import reference_markdown
from supervisor.testing.cluster import free_port, sim_slot, start_prometheus, start_supervisor

ROOT = Path(__file__).parents[2]
RULES = ROOT / "systemd" / "prometheus"
needs_prometheus = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="prometheus / promtool not installed (Debian package prometheus)",
)


def test_metrics_reference_is_in_step_with_the_code() -> None:
    assert (ROOT / "docs" / "metrics.md").read_text() == reference_markdown(), (
        "regenerate it: failover-supervisor metrics-doc > docs/metrics.md"
    )


@needs_prometheus
def test_alert_rules_check_and_unit_tests_pass() -> None:
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        out = subprocess.run(["promtool", *args], cwd=RULES, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


@needs_prometheus
@pytest.mark.anyio
async def test_real_prometheus_sees_the_failover_counter_rise(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    sup = await start_supervisor(tmp_path / "sup", [sim_slot("s")])
    port = free_port()
    target = sup.admin_url.removeprefix("http://")
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files: [{RULES / 'alerts.yml'}]\n"
        "scrape_configs:\n  - job_name: failover-supervisor\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
    )
    prom = await anyio.to_thread.run_sync(start_prometheus, cfg, tmp_path, port)
    api = f"http://127.0.0.1:{port}/api/v1/query"

    async def query(q: str) -> float | None:
        async with session.get(api, params={"query": q}) as r:
            data = await r.json()
        result = data["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    try:
        with anyio.fail_after(30):  # scraped: the epoch is there
            while True:
                try:
                    if await query('failover_supervisor_slot_epoch{slot="s"}') == 1:
                        break
                except aiohttp.ClientError:
                    pass
                await anyio.sleep(0.2)
        async with session.get(sup.admin_url + "/status") as r:
            st = await r.json()
        active = next(e for e in st["engines"] if e["state"] == "active")
        os.killpg(active["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        with anyio.fail_after(30):
            while (await query("sum(failover_supervisor_failovers_total)") or 0) < 1:
                await anyio.sleep(0.2)
        assert await query('failover_supervisor_slot_epoch{slot="s"}') == 2
        print(f"Prometheus saw the failover {time.monotonic() - t0:.1f}s after the kill")
    finally:
        prom.terminate()
        prom.wait(timeout=10)
        assert await anyio.to_thread.run_sync(sup.stop) == 0


def test_grafana_dashboard_uses_only_metrics_that_exist() -> None:
    import json
    import re

    dash = json.loads((ROOT / "systemd" / "grafana-dashboard.json").read_text())
    known = set(re.findall(r"`(failover_supervisor_\w+)`", reference_markdown()))
    for panel in dash["panels"]:
        for name in re.findall(r"failover_supervisor_\w+", panel["targets"][0]["expr"]):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in known or base in known, (panel["title"], name)
