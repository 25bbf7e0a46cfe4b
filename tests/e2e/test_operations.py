"""Zero-downtime operations through the real daemon and simulated engines: config reload,
maintenance mode, scheduled switchover, rolling engine upgrades under live streams, and a
drain that moves the streams it cannot finish."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from bench.load import LoadSpec, run_load, summarize
from bench.operations import SIM_ARGS as SIM
from bench.operations import Streams, largest_gap, until
from supervisor.testing.cluster import render_config, sim_slot
from supervisor.testing.gpuledger import process_start_time
from tests.e2e import test_single_node
from tests.e2e.test_single_node import Admin, slot_of

daemon = test_single_node.daemon  # the fixture: a real daemon per test, stopped after it

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

SHORT = {"model": "sim-model", "prompt": "a", "max_tokens": 2}


def pooled(**kw: Any) -> dict[str, Any]:
    """A slot whose shadow has a GPU of its own: it can wake while the active serves."""
    return sim_slot("s", placement="pooled", gpus=["0"], shadow_gpus=[["1"]], sim_args=SIM, **kw)


def rewrite(admin: Admin, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit the running daemon's config file, as an operator would."""
    path = admin.sup.config_path
    cfg = tomllib.loads(path.read_text())
    change(cfg)
    path.write_text(render_config(cfg))


def environ_of(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def gone(pid: int) -> bool:
    return process_start_time(pid) is None


async def test_reload_applies_what_it_can_and_a_bad_file_changes_nothing(
    daemon: Any, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    admin: Admin = await daemon(sim_slot("s"))
    url = admin.sup.frontend_url
    before = await admin.status()
    original = admin.sup.config_path.read_text()

    # A file that does not validate: refused with every problem named, nothing changed.
    rewrite(admin, lambda c: c["health"].update(stall_timeout="soon", probe_interval=-1))
    code, answer = await admin.post("/reload", {})
    assert code == 400, answer
    problems = "\n".join(answer["error"]["problems"])
    assert "health.stall_timeout" in problems and "health.probe_interval" in problems
    after = await admin.status()
    assert [e["pid"] for e in after["engines"]] == [e["pid"] for e in before["engines"]]
    async with session.post(url + "/v1/completions", json=SHORT) as r:
        assert r.status == 200  # no key needed: nothing was applied

    # SIGHUP with the same bad file: refused as well, and the daemon serves on.
    admin.sup.proc.send_signal(signal.SIGHUP)
    await until(lambda: _logged(admin, "reload refused", 2), what="the refusal in the log")
    assert admin.sup.proc.poll() is None

    # A good file: applied at once where possible, a slot marked, a restart named.
    key = tmp_path / "api-key"
    key.write_text("sekrit\n")
    admin.sup.config_path.write_text(original)

    def good(c: dict[str, Any]) -> None:
        c["frontend"]["api_key_file"] = str(key)
        c["health"]["stall_timeout"] = 7.5
        c["frontend"]["port"] = c["frontend"]["port"] + 1
        c["slot"][0]["env"] = {"ROLLOUT_MARK": "2"}

    rewrite(admin, good)
    code, answer = await admin.post("/reload", {})
    assert code == 200, answer
    effects = {c["key"]: c["effect"] for c in answer["changes"]}
    assert effects == {
        "frontend.api_key_file": "applied",
        "health.stall_timeout": "applied",
        "frontend.port": "restart",
        "slot[s].env": "rollout",
    }
    assert answer["rollout_pending"] == ["s"] and answer["restart_needed"] == ["frontend.port"]
    st = await admin.status()
    assert slot_of(st)["rollout_pending"] == ["env"]
    assert [e["pid"] for e in st["engines"]] == [e["pid"] for e in before["engines"]]
    assert 'failover_supervisor_slot_rollout_pending{slot="s"} 1.0' in await admin.metrics()
    body = SHORT
    async with session.post(url + "/v1/completions", json=body) as r:
        assert r.status == 401  # the new key is in force
    auth = {"Authorization": "Bearer sekrit"}
    async with session.post(url + "/v1/completions", json=body, headers=auth) as r:
        assert r.status == 200

    # SIGHUP, as `systemctl reload` sends: the key is dropped again.
    admin.sup.config_path.write_text(original)
    admin.sup.proc.send_signal(signal.SIGHUP)
    await until(lambda: _logged(admin, '"config reloaded"', 2), what="the second reload")
    async with session.post(url + "/v1/completions", json=body) as r:
        assert r.status == 200
    assert slot_of(await admin.status())["rollout_pending"] is None


async def test_the_access_log_is_a_line_per_request_until_turned_off(
    daemon: Any, session: aiohttp.ClientSession
) -> None:
    """Every request gets an info line with its id and outcome; ``access_log = false``
    (applied by a reload) drops that line, and nothing else."""
    admin: Admin = await daemon(sim_slot("s"))
    url = admin.sup.frontend_url

    async def ask(rid: str) -> None:
        headers = {"X-Request-Id": rid}
        async with session.post(url + "/v1/completions", json=SHORT, headers=headers) as r:
            assert r.status == 200, await r.text()

    def request_lines(rid: str) -> list[str]:
        return [
            line
            for line in admin.sup.logs().splitlines()
            if '"event": "request"' in line and f'"request_id": "{rid}"' in line
        ]

    await ask("logged-1")
    await until(lambda: _true(bool(request_lines("logged-1"))), what="the access log line")
    assert '"outcome": "ok"' in request_lines("logged-1")[0]

    rewrite(admin, lambda c: c["frontend"].update(access_log=False))
    code, answer = await admin.post("/reload", {})
    assert code == 200, answer
    assert {c["key"]: c["effect"] for c in answer["changes"]} == {"frontend.access_log": "applied"}
    await ask("quiet-1")  # (the line, when there is one, is written before the answer)
    assert request_lines("quiet-1") == []
    assert '"config reloaded"' in admin.sup.logs()  # other info lines go on


async def _true(value: bool) -> bool:
    return value


async def _logged(admin: Admin, text: str, times: int = 1) -> bool:
    return admin.sup.logs().count(text) >= times


def test_check_config_diff_says_what_a_reload_would_do(tmp_path: Path) -> None:
    slot = sim_slot("s")
    old = {"node": {"state_dir": str(tmp_path)}, "health": {"stall_timeout": 5}, "slot": [slot]}
    new = {
        "node": {"state_dir": str(tmp_path)},
        "health": {"stall_timeout": 9},
        "admin": {"port": 9471},
        "slot": [{**slot, "extra_args": ["--max-model-len", "512"]}],
    }
    (tmp_path / "old.toml").write_text(render_config(old))
    (tmp_path / "new.toml").write_text(render_config(new))
    out = subprocess.run(
        [
            *(sys.executable, "-m", "supervisor", "check-config", "--diff"),
            *(str(tmp_path / "old.toml"), str(tmp_path / "new.toml")),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "applied  health.stall_timeout: 5.0 -> 9.0" in out
    assert "restart  admin_port: 8470 -> 9471" in out
    assert "rollout  slot[s].extra_args: [] -> ['--max-model-len', '512']" in out
    assert "slots to roll out after the reload: s" in out


async def test_pause_stops_failover_and_resume_restores_it(
    daemon: Any, session: aiohttp.ClientSession
) -> None:
    admin: Admin = await daemon(sim_slot("s"))
    url = admin.sup.frontend_url
    st = await admin.status()
    active = next(e for e in st["engines"] if e["id"] == slot_of(st)["active"])
    shadow = next(e for e in st["engines"] if e["state"] == "sleeping")
    code, answer = await admin.post("/pause", {"reason": "kernel upgrade"})
    assert code == 200 and answer["slot"] is None, answer
    assert 'failover_supervisor_slot_paused{slot="s"} 1.0' in await admin.metrics()
    assert (await admin.status())["paused"]["reason"] == "kernel upgrade"

    os.killpg(active["pid"], signal.SIGKILL)
    st = await admin.wait(lambda s: slot_of(s)["active"] is None, what="the active's loss")
    assert "paused" in slot_of(st)["degraded_reason"]
    await anyio.sleep(1.0)  # long enough for a failover and a relaunch, were they allowed
    st = await admin.status()
    assert slot_of(st)["active"] is None and slot_of(st)["phase"] == "degraded"
    assert [e["id"] for e in st["engines"]] == [shadow["id"]]  # nothing relaunched
    assert st["engines"][0]["state"] == "sleeping"
    async with session.post(url + "/v1/completions", json=SHORT) as r:
        assert r.status == 503

    code, answer = await admin.post("/resume", {})
    assert code == 200, answer
    st = await admin.wait(lambda s: slot_of(s)["active"] == shadow["id"], what="promotion")
    async with session.post(url + "/v1/completions", json=SHORT) as r:
        assert r.status == 200
    code, _ = await admin.post("/resume", {})
    assert code == 409  # not paused

    # A slot's pause with an end runs out by itself.
    code, answer = await admin.post("/pause", {"slot": "s", "for": 0.5})
    assert code == 200 and answer["paused"]["until"] is not None
    assert slot_of(await admin.status())["paused"] is not None
    await admin.wait(lambda s: slot_of(s)["paused"] is None, what="the pause's expiry")

    async def unpaused_metric() -> bool:
        return 'failover_supervisor_slot_paused{slot="s"} 0.0' in await admin.metrics()

    await until(unpaused_metric, what="the metric to follow the expiry")
    code, answer = await admin.post("/pause", {"for": "a while"})
    assert code == 400


async def test_scheduled_switchover_fires_and_can_be_cancelled(daemon: Any) -> None:
    admin: Admin = await daemon(sim_slot("s"))
    st = await admin.status()
    epoch = slot_of(st)["epoch"]
    code, answer = await admin.post("/switchover", {"slot": "s", "after": 0.5})
    assert code == 202, answer
    assert slot_of(await admin.status())["scheduled_switchover"]["in_s"] <= 0.5
    st = await admin.wait(lambda s: slot_of(s)["epoch"] == epoch + 1, what="the switchover")
    assert slot_of(st)["scheduled_switchover"] is None
    assert st["failovers"][0]["kind"] == "switchover"
    assert st["failovers"][0]["result"] == "promoted"

    await admin.wait(lambda s: any(e["state"] == "sleeping" for e in s["engines"]))
    at = time.time() + 60
    code, answer = await admin.post("/switchover", {"slot": "s", "at": at})
    assert code == 202 and abs(answer["scheduled"]["at"] - at) < 0.01
    code, answer = await admin.post("/switchover/cancel", {"slot": "s"})
    assert code == 200, answer
    assert slot_of(await admin.status())["scheduled_switchover"] is None
    code, _ = await admin.post("/switchover/cancel", {"slot": "s"})
    assert code == 404
    code, answer = await admin.post("/switchover", {"slot": "s", "at": "tomorrow-ish"})
    assert code == 400 and "ISO 8601" in answer["error"]["message"]
    # Found by the fuzzer: times the platform cannot even log were a 500.
    for far in (2.3755579900710318e45, -1e300, "9999-12-31T00:00:00Z"):
        code, answer = await admin.post("/switchover", {"slot": "s", "at": far})
        assert code == 400 and "31 years" in answer["error"]["message"], (far, answer)
    code, answer = await admin.post("/pause", {"until": 1e300})
    assert code == 400 and "31 years" in answer["error"]["message"], answer
    await anyio.sleep(0.5)
    assert slot_of(await admin.status())["epoch"] == epoch + 1


@pytest.mark.parametrize("placement", ["pooled", "paired"])
async def test_rollout_moves_20_live_streams_token_exact_to_the_new_spec(
    daemon: Any, session: aiohttp.ClientSession, placement: str
) -> None:
    """Pooled: the new engine wakes on its own GPU while the old one serves (make before
    break). Paired: they share a GPU, so the streams wait while the old one stops and the
    new one wakes. Either way every stream comes out whole."""
    admin: Admin = await daemon(pooled() if placement == "pooled" else sim_slot("s", sim_args=SIM))
    url = admin.sup.frontend_url
    old = await admin.status()
    old_pids = [e["pid"] for e in old["engines"]]
    streams = Streams(session, url, [400] * 20)
    async with anyio.create_task_group() as tg:
        streams.start(tg)
        await until(streams.under_way(50), what="20 streams under way")
        rewrite(admin, lambda c: c["slot"][0].update(env={"ROLLOUT_MARK": "2"}))
        code, answer = await admin.post("/reload", {})
        assert code == 200 and answer["rollout_pending"] == ["s"], answer
        code, answer = await admin.post("/rollout", {"slots": ["s"], "wait": True})
        assert code == 200, json.dumps(answer, indent=1) + admin.sup.logs()[-3000:]
    got = streams.check()
    rollout = answer["rollouts"][0]
    assert rollout["result"] == "done" and rollout["migrated_streams"] == 20, rollout
    for g in got:
        assert g["failover"] == [{"migrations": 1, "inexact": []}]
    gaps = sorted(largest_gap(g["at"]) * 1000 for g in got)
    print(f"{placement} rollout stall: p50 {statistics.median(gaps):.1f} ms, max {gaps[-1]:.1f} ms")

    st = await admin.wait(
        lambda s: len([e for e in s["engines"] if e["state"] in ("active", "sleeping")]) == 2,
        what="the new spec's shadow",
    )
    assert slot_of(st)["generation"] == 1 and slot_of(st)["rollout_pending"] is None
    for e in st["engines"]:
        assert e["generation"] == 1, e
        assert b"ROLLOUT_MARK=2" in environ_of(e["pid"]), e["id"]
    await until(lambda: _true(all(gone(p) for p in old_pids)), what="the old engines' exit")
    assert st["failovers"][0]["kind"] == "rollout" and st["failovers"][0]["moved_streams"] == 20
    assert 'failover_supervisor_rollouts_total{result="done",slot="s"} 1.0' in (
        await admin.metrics()
    )


async def _true(value: bool) -> bool:
    return value


async def test_rollout_whose_new_engine_fails_rolls_back_and_loses_nothing(
    daemon: Any, session: aiohttp.ClientSession
) -> None:
    admin: Admin = await daemon(pooled())
    url = admin.sup.frontend_url
    old = await admin.status()
    streams = Streams(session, url, [300] * 5)
    async with anyio.create_task_group() as tg:
        streams.start(tg)
        await until(streams.under_way(20), what="5 streams under way")
        rewrite(admin, lambda c: c["slot"][0].update(sim_args=[*SIM, "--sim-no-such-flag"]))
        code, answer = await admin.post("/reload", {})
        assert code == 200, answer
        code, answer = await admin.post("/rollout", {"wait": True})
        assert code == 409, answer
    streams.check()
    rollout = answer["rollouts"][0]
    assert rollout["result"] == "rolled_back", rollout
    assert "did not come up" in rollout["reason"]
    st = await admin.wait(
        lambda s: len([e for e in s["engines"] if e["state"] in ("active", "sleeping")]) == 2,
        what="the old spec's shadow back",
    )
    assert slot_of(st)["active"] == slot_of(old)["active"]  # it never stopped serving
    assert all(e["generation"] == 0 for e in st["engines"])
    assert slot_of(st)["rollout_pending"] == ["sim_args"]  # still what the file says
    assert 'failover_supervisor_rollouts_total{result="rolled_back",slot="s"} 1.0' in (
        await admin.metrics()
    )
    assert "rolling back" in admin.sup.logs()


async def test_drain_past_its_limit_moves_streams_instead_of_cutting_them(
    daemon: Any, session: aiohttp.ClientSession
) -> None:
    admin: Admin = await daemon(pooled())
    url = admin.sup.frontend_url
    st = await admin.status()
    old = slot_of(st)["active"]
    # 6 streams of 4 s, 2 of 0.3 s: the short ones end within the limit where they are.
    streams = Streams(session, url, [400] * 6 + [30] * 2)
    async with anyio.create_task_group() as tg:
        streams.start(tg)
        await until(streams.under_way(5), what="8 streams under way")
        code, answer = await admin.post("/drain", {"engine": old, "limit": 1.0})
        assert code == 200, answer
    got = streams.check()
    assert all(g["failover"] == [{"migrations": 1, "inexact": []}] for g in got[:6])
    assert all(g["failover"] == [] for g in got[6:])
    st = await admin.status()
    record = st["failovers"][0]
    assert record["kind"] == "drain" and record["moved_streams"] == 6, record
    assert record["steps"]["drain"] >= 0.9, record  # the long ones had their limit first
    assert slot_of(st)["active"] != old


async def test_a_pause_survives_a_restart_of_the_daemon(daemon: Any, tmp_path: Path) -> None:
    """Maintenance often includes restarting the daemon: its pause (and a slot's) holds."""
    slot = sim_slot("s")
    admin: Admin = await daemon(slot, node={"on_exit": "leave"})
    code, _ = await admin.post("/pause", {"reason": "driver upgrade"})
    assert code == 200
    code, _ = await admin.post("/pause", {"slot": "s", "reason": "new weights", "for": 600})
    assert code == 200
    before = await admin.status()
    assert await anyio.to_thread.run_sync(admin.sup.stop) == 0
    state = admin.sup.config_path.parent / "state"
    again: Admin = await daemon(slot, node={"state_dir": str(state)})  # stops its engines
    st = await again.status()
    assert st["paused"]["reason"] == "driver upgrade"
    assert slot_of(st)["paused"]["reason"] == "new weights"
    assert [e["pid"] for e in st["engines"]] == [e["pid"] for e in before["engines"]]
    code, _ = await again.post("/resume", {})
    assert code == 200
    code, _ = await again.post("/resume", {"slot": "s"})
    assert code == 200
    assert (await again.status())["paused"] is None


async def test_operator_commands(daemon: Any) -> None:
    """The CLI's reload, pause, resume, switchover and rollout, as an operator types them."""
    admin: Admin = await daemon(pooled())

    async def cli(*args: str, url: str = admin.sup.admin_url) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "supervisor", *args, "--admin", url]
        return await anyio.to_thread.run_sync(
            lambda: subprocess.run(argv, capture_output=True, text=True, timeout=120)
        )

    out = await cli("pause", "s", "--for", "60", "--reason", "testing")
    assert out.returncode == 0 and "slot s paused until" in out.stdout, out
    rewrite(admin, lambda c: c["slot"][0].update(env={"ROLLOUT_MARK": "cli"}))
    out = await cli("rollout")  # reloads, then is refused: paused
    assert "rollout  slot[s].env" in out.stdout, out
    assert out.returncode == 1 and "paused" in out.stderr, out
    out = await cli("resume", "s")
    assert out.returncode == 0 and "resumed s" in out.stdout, out
    out = await cli("switchover", "s", "--after", "30")
    assert out.returncode == 0 and "scheduled for" in out.stdout, out
    out = await cli("switchover", "s", "--cancel")
    assert out.returncode == 0 and "cancelled" in out.stdout, out
    out = await cli("switchover", "s")
    assert out.returncode == 0 and "switched over to" in out.stdout, out
    await admin.wait(lambda s: any(e["state"] == "sleeping" for e in s["engines"]))
    out = await cli("rollout", "--no-reload")  # the spec the reload above marked
    assert out.returncode == 0 and "slot s: done" in out.stdout, out
    assert "switching over" in out.stdout  # progress, step by step
    await admin.wait(lambda s: any(e["state"] == "sleeping" for e in s["engines"]))
    out = await cli("rollout")
    assert out.returncode == 1 and "reloaded: no changes" in out.stdout, out
    assert "nothing to roll out" in out.stderr, out
    out = await cli("reload")
    assert out.returncode == 0 and "reloaded: no changes" in out.stdout, out
    admin.sup.config_path.write_text("[node\n")
    out = await cli("reload")
    assert out.returncode == 1 and "not valid TOML" in out.stderr, out
    out = await cli("reload", url="http://127.0.0.1:9")
    assert out.returncode == 2 and "cannot reach the admin API" in out.stderr, out


async def test_rollout_under_the_load_client_loses_no_request(daemon: Any) -> None:
    """The load client (completions and chat, streamed and not) runs through a rollout
    that also changes the shadow count (2 -> 1): no request fails, every answer is exact."""
    admin: Admin = await daemon(
        sim_slot(
            "s",
            shadows=2,
            placement="pooled",
            gpus=["0"],
            shadow_gpus=[["1"], ["2"]],
            sim_args=SIM,
        )
    )
    spec = LoadSpec(clients=8, requests_per_client=6, max_tokens=120, seed=3)
    stop = anyio.Event()
    results: list[Any] = []

    async def load() -> None:
        results.extend(await run_load([admin.sup.frontend_url], spec, stop=stop))

    async with anyio.create_task_group() as tg:
        tg.start_soon(load)
        await anyio.sleep(0.5)
        rewrite(
            admin,
            lambda c: c["slot"][0].update(
                shadows=1, shadow_gpus=[["1"]], env={"ROLLOUT_MARK": "load"}
            ),
        )
        code, answer = await admin.post("/reload", {})
        assert code == 200 and answer["rollout_pending"] == ["s"], answer
        code, answer = await admin.post("/rollout", {"wait": True})
        assert code == 200, answer
    summary = summarize(results)
    assert summary["requests"] == 48 and summary["failed"] == 0, summary
    assert summary["rejected_503"] == 0 and summary["inexact"] == 0, summary
    st = await admin.wait(
        lambda s: (
            len([e for e in s["engines"] if e["state"] in ("active", "sleeping")]) == 2
            and len(s["engines"]) == 2
        ),
        what="one active and one shadow of the new spec",
    )
    assert {e["generation"] for e in st["engines"]} == {1}
    assert slot_of(st)["shadows_configured"] == 1


async def test_status_shows_what_an_operator_set_in_motion(daemon: Any, tmp_path: Path) -> None:
    """``status`` says at a glance what the JSON holds: pauses with their reason and end,
    a scheduled switchover, a pending rollout, each engine's generation; every admin
    command takes ``--admin`` and ``--token-file``; a switchover ``--at`` a past time is
    refused (by the API, for every client) instead of firing at once as "scheduled"."""
    token = tmp_path / "admin-token"
    token.write_text("s3cret\n")
    admin: Admin = await daemon(sim_slot("s"), admin={"token_file": str(token)})
    auth = ("--admin", admin.sup.admin_url, "--token-file", str(token))

    async def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "supervisor", *args]
        return await anyio.to_thread.run_sync(
            lambda: subprocess.run(argv, capture_output=True, text=True, timeout=60)
        )

    st = await admin.status()
    shadow = next(e["id"] for e in st["engines"] if e["role"] == "shadow")
    epoch = slot_of(st)["epoch"]
    out = await cli("pause", "--for", "3600", "--reason", "driver upgrade", *auth)
    assert out.returncode == 0, out
    out = await cli("pause", "s", *auth)
    assert out.returncode == 0, out
    out = await cli("switchover", "s", "--after", "600", "--to", shadow, *auth)
    assert out.returncode == 0 and "scheduled for" in out.stdout, out
    rewrite(admin, lambda c: c["slot"][0].update(env={"ROLLOUT_MARK": "2"}))
    out = await cli("reload", *auth)
    assert out.returncode == 0 and "to roll out: s" in out.stdout, out

    out = await cli("status", *auth)
    assert out.returncode == 0, out
    lines = out.stdout.splitlines()
    assert any(
        line.startswith("node paused until ") and "(in 59 min): driver upgrade" in line
        for line in lines
    ), out.stdout
    assert "slot s: paused until resumed: maintenance" in lines, out.stdout
    assert any(
        line.startswith(f"slot s: switchover to {shadow} scheduled for ") and "(in 9 min)" in line
        for line in lines
    ), out.stdout
    assert "slot s: rollout pending (env): failover-supervisor rollout" in lines, out.stdout
    header = next(line for line in lines if line.startswith("ENGINE"))
    assert header.split()[5] == "GEN", header
    for e in st["engines"]:
        row = next(line for line in lines if line.startswith(e["id"] + " "))
        assert row.split()[5] == "0", row  # generation 0 until a rollout

    # A past time: refused with the time and how far back it is; nothing was scheduled.
    past = time.strftime("%Y-%m-%dT%H:%M", time.localtime(time.time() - 86400))
    out = await cli("switchover", "s", "--at", past, *auth)
    assert out.returncode == 1, out
    assert "in the past: give a later time" in out.stderr and "24 h" in out.stderr, out
    assert "Traceback" not in out.stderr
    plan = slot_of(await admin.status())["scheduled_switchover"]
    assert plan is not None and plan["to"] == shadow and plan["in_s"] > 500, plan
    out = await cli("switchover", "s", "--at", "tomorrow-ish", *auth)
    assert out.returncode == 2 and "is not a time" in out.stderr, out
    # A time of day is the next one: never in the past.
    out = await cli("switchover", "s", "--at", time.strftime("%H:%M"), "--to", shadow, *auth)
    assert out.returncode == 0 and "scheduled for" in out.stdout, out
    in_s = slot_of(await admin.status())["scheduled_switchover"]["in_s"]
    assert 86400 - 120 < in_s <= 86400, in_s
    # The API directly, for a switchover and for a pause's end.
    headers = {"Authorization": "Bearer s3cret"}
    for path, body in (
        ("/switchover", {"slot": "s", "at": time.time() - 60}),
        ("/pause", {"until": time.time() - 60}),
    ):
        async with admin.session.post(admin.sup.admin_url + path, json=body, headers=headers) as r:
            answer = await r.json()
            assert r.status == 400 and "in the past" in answer["error"]["message"], answer
    assert slot_of(await admin.status())["epoch"] == epoch

    # drain, with the same options; it names what serves the slot afterwards.
    out = await cli("switchover", "s", "--cancel", *auth)
    assert out.returncode == 0, out
    for args in (("resume", "s"), ("resume",)):
        out = await cli(*args, *auth)
        assert out.returncode == 0, out
    active = slot_of(await admin.status())["active"]
    out = await cli("drain", active, "--limit", "1", *auth)
    assert out.returncode == 0 and f"drained {active}" in out.stdout, out
    assert f"slot s: active {shadow} at epoch {epoch + 1}" in out.stdout, out
    out = await cli("drain", "nope", *auth)
    assert out.returncode == 1 and "no engine 'nope'" in out.stderr, out
    out = await cli("drain", active, "--admin", admin.sup.admin_url)  # no token
    assert out.returncode == 1 and "Authorization: Bearer" in out.stderr, out


async def test_sigterm_during_a_rollout_stops_cleanly(daemon: Any) -> None:
    # The rollout is launching its new shadow (3 s to load) when the daemon is told to stop:
    # the rollout ends as interrupted, nothing of the slot starts any more, and the daemon
    # exits 0 with every engine stopped.
    admin: Admin = await daemon(pooled())
    rewrite(admin, lambda c: c["slot"][0].update(sim_args=[*SIM, "--sim-load-time", "3"]))
    code, answer = await admin.post("/reload", {})
    assert code == 200, answer
    code, answer = await admin.post("/rollout", {})
    assert code in (200, 202), answer
    st = await admin.wait(
        lambda s: any(e["generation"] == 1 and e["state"] == "loading" for e in s["engines"]),
        what="the new spec's shadow loading",
    )
    pids = [e["pid"] for e in st["engines"] if e["pid"]]
    admin.sup.proc.send_signal(signal.SIGTERM)
    code = await anyio.to_thread.run_sync(lambda: admin.sup.proc.wait(timeout=40))
    logs = admin.sup.logs()
    assert code == 0, logs[-4000:]
    assert "Traceback" not in logs, logs[-4000:]
    assert len([ln for ln in logs.splitlines() if "-> stopped on stop" in ln]) == 1, logs[-4000:]
    assert [p for p in pids if not gone(p)] == [], logs[-4000:]
