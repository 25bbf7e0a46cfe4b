"""Prometheus for real: promtool on the shipped rules, and a Prometheus server scraping a
running supervisor through a failover."""

from __future__ import annotations

import json
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
from supervisor.testing.cluster import (
    FAST_SIM_ARGS,
    free_port,
    sim_slot,
    start_prometheus,
    start_supervisor,
)

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
    """One failover that migrates two streams: the dashboard's queries (increase() over its
    window) say 1 and 2 — the series existed at 0 before, so their first event counts — and
    no alert fires."""
    sim = (*FAST_SIM_ARGS, "--sim-itl", "0.02")
    sup = await start_supervisor(tmp_path / "sup", [sim_slot("s", sim_args=sim)])
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

    async def stream() -> None:
        body = {"model": "sim-model", "prompt": "the river", "max_tokens": 200, "stream": True}
        async with session.post(sup.frontend_url + "/v1/completions", json=body) as r:
            assert r.status == 200
            await r.read()

    dashboard = {
        panel["title"]: panel["targets"][0]["expr"]
        for panel in json.loads((ROOT / "systemd" / "grafana-dashboard.json").read_text())["panels"]
    }

    try:
        with anyio.fail_after(30):  # scraped: the epoch is there
            while True:
                try:
                    if await query('failover_supervisor_slot_epoch{slot="s"}') == 1:
                        break
                except aiohttp.ClientError:
                    pass
                await anyio.sleep(0.2)
        # Known label sets are there at 0 before any event; no *_created series, no cluster
        # gauges on a single node.
        assert await query("sum(failover_supervisor_failovers_total)") == 0
        assert await query('failover_supervisor_migrations_total{mode="token_ids"}') == 0
        assert await query('count({__name__=~"failover_supervisor_.*_created"})') is None
        assert await query("failover_supervisor_etcd_reachable") is None
        await anyio.sleep(2)  # a few scrapes at 0
        async with session.get(sup.admin_url + "/status") as r:
            st = await r.json()
        active = next(e for e in st["engines"] if e["state"] == "active")
        async with anyio.create_task_group() as tg:
            tg.start_soon(stream)
            tg.start_soon(stream)
            await anyio.sleep(1.0)  # both streaming
            os.killpg(active["pid"], signal.SIGKILL)
            t0 = time.monotonic()
        with anyio.fail_after(30):
            while (await query("sum(failover_supervisor_failovers_total)") or 0) < 1:
                await anyio.sleep(0.2)
        print(f"Prometheus saw the failover {time.monotonic() - t0:.1f}s after the kill")
        assert await query('failover_supervisor_slot_epoch{slot="s"}') == 2
        await anyio.sleep(3)  # the migrations' counter scraped too
        failovers = await query(f"round(sum({dashboard['Failovers (per 5 min)']}))")
        migrations = await query(f"round(sum({dashboard['Migrations (per 5 min)']}))")
        assert (failovers, migrations) == (1, 2)
        assert await query('count(ALERTS{alertstate="firing"})') is None
    finally:
        prom.terminate()
        prom.wait(timeout=10)
        assert await anyio.to_thread.run_sync(sup.stop) == 0


def test_grafana_dashboard_uses_only_metrics_that_exist() -> None:
    import re

    dash = json.loads((ROOT / "systemd" / "grafana-dashboard.json").read_text())
    known = set(re.findall(r"`(failover_supervisor_\w+)`", reference_markdown()))
    for panel in dash["panels"]:
        for name in re.findall(r"failover_supervisor_\w+", panel["targets"][0]["expr"]):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert name in known or base in known, (panel["title"], name)
