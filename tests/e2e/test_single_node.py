"""The real daemon on one node with simulated engines as real processes."""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from supervisor.testing.admin import AdminClient
from supervisor.testing.cluster import (
    FAST_SIM_ARGS,
    SupervisorProcess,
    sim_slot,
    start_supervisor,
)
from supervisor.testing.gpuledger import GIB, GpuLedger, process_start_time
from supervisor.upstream import iter_sse_data

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


class Admin(AdminClient):
    """The node's admin API, with the supervisor process behind it."""

    def __init__(self, sup: SupervisorProcess, session: aiohttp.ClientSession) -> None:
        super().__init__(sup.admin_url, session, logs=sup.logs)
        self.sup = sup


def slot_of(st: dict[str, Any], name: str = "s") -> dict[str, Any]:
    return next(s for s in st["slots"] if s["name"] == name)


def engine_of(st: dict[str, Any], engine_id: str) -> dict[str, Any]:
    """An engine of the slot, or one that has left it (failed or stopped, now retired)."""
    return next(e for e in st["engines"] + st["retired_engines"] if e["id"] == engine_id)


def active_of(st: dict[str, Any], name: str = "s") -> dict[str, Any]:
    return engine_of(st, slot_of(st, name)["active"])


def full_strength(st: dict[str, Any], name: str = "s", shadows: int = 1) -> bool:
    s = slot_of(st, name)
    sleeping = [e for e in st["engines"] if e["slot"] == name and e["state"] == "sleeping"]
    return s["active"] is not None and len(sleeping) >= shadows


@pytest.fixture
async def daemon(
    tmp_path: Path, session: aiohttp.ClientSession
) -> AsyncIterator[Callable[..., Any]]:
    started: list[SupervisorProcess] = []

    async def start(*slots: dict[str, Any], **kw: Any) -> Admin:
        sup = await start_supervisor(
            tmp_path / f"sup{len(started)}", slots or [sim_slot("s")], **kw
        )
        started.append(sup)
        return Admin(sup, session)

    yield start
    for sup in started:
        code = await anyio.to_thread.run_sync(sup.stop)
        assert code == 0, sup.logs()[-3000:]


async def complete(session: aiohttp.ClientSession, url: str, n: int = 4) -> int:
    async with session.post(
        url + "/v1/completions", json={"prompt": "the river", "max_tokens": n}
    ) as r:
        return r.status


async def test_shadow_sleeps_and_primary_serves(
    daemon: Any, session: aiohttp.ClientSession, own_gpu_ledger: Path
) -> None:
    admin = await daemon()
    st = await admin.status()
    assert st["ready"] and slot_of(st)["epoch"] == 1
    active = active_of(st)
    shadow = next(e for e in st["engines"] if e["role"] == "shadow")
    assert (active["state"], shadow["state"]) == ("active", "sleeping")
    # Memory per the ledger: active 16 + 48 GiB, the sleeping shadow its 16 GiB of weights.
    assert GpuLedger(own_gpu_ledger).usage()["0"].used == (64 + 16) * GIB
    assert await complete(session, active["url"]) == 200
    assert await complete(session, shadow["url"]) == 503
    assert 'failover_supervisor_shadows_available{slot="s"} 1.0' in await admin.metrics()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP])
async def test_dead_active_is_replaced_by_the_woken_shadow(
    daemon: Any, session: aiohttp.ClientSession, sig: signal.Signals
) -> None:
    admin = await daemon()
    st = await admin.status()
    old = active_of(st)
    shadow = next(e for e in st["engines"] if e["role"] == "shadow")
    os.killpg(old["pid"], sig)
    st = await admin.wait(lambda s: slot_of(s)["epoch"] == 2, what="promotion")
    assert slot_of(st)["active"] == shadow["id"]
    assert engine_of(st, old["id"])["state"] == "failed"
    rec = st["failovers"][0]
    assert rec["result"] == "promoted" and rec["failed_engine"] == old["id"]
    assert {"wake", "promote"} <= set(rec["steps"])
    # SIGTERM: the engine drains (its /health answers 503) and then exits; whichever the
    # judge sees first, exit or failed probes, is a correct detection.
    sources = {
        signal.SIGKILL: ("exit",),
        signal.SIGTERM: ("exit", "probe"),
        signal.SIGSTOP: ("probe",),
    }[sig]
    assert rec["reason"].split(":")[0] in sources, rec
    source = rec["reason"].split(":")[0]
    assert await complete(session, shadow["url"]) == 200
    # The slot goes back to full strength: a new shadow replaces the failed engine.
    st = await admin.wait(full_strength, what="a replacement shadow")
    assert 'failover_supervisor_failovers_total{reason="failover:' + source in await admin.metrics()
    if sig == signal.SIGSTOP:  # the hung engine was killed, not left stopped
        with anyio.fail_after(5):
            while process_start_time(old["pid"]) is not None:
                await anyio.sleep(0.02)


async def test_slot_without_shadow_degrades_then_restarts_cold(
    daemon: Any, session: aiohttp.ClientSession
) -> None:
    admin = await daemon(sim_slot("s", shadows=0))
    old = active_of(await admin.status())
    os.killpg(old["pid"], signal.SIGKILL)
    assert 'failover_supervisor_slot_degraded{slot="s"}' in await admin.metrics()
    st = await admin.wait(
        lambda s: slot_of(s)["epoch"] == 2 and not slot_of(s)["degraded"], what="cold restart"
    )
    assert await complete(session, active_of(st)["url"]) == 200
    # The failover's record says how it ended, once the cold restart is done.
    rec = st["failovers"][0]
    assert rec["result"] == "cold-restarted", rec
    assert rec["promoted_engine"] == slot_of(st)["active"] and rec["epoch"] == 2
    assert slot_of(st)["phase"] == "serving"


async def test_paired_shadow_waits_for_the_dead_engines_memory(
    daemon: Any, session: aiohttp.ClientSession
) -> None:
    # The worker outlives a SIGKILLed API server by 0.8 s and holds the GPU meanwhile (the
    # supervisor lets it exit on its own); with OOM retries off, waking the shadow any
    # earlier would fail the failover.
    slow_release = (*FAST_SIM_ARGS, "--sim-release-delay", "0.8")
    admin = await daemon(
        sim_slot("s", sim_args=slow_release),
        failover={"wake_oom_retry": 0, "kill_dead_group": False},
    )
    st = await admin.status()
    old = active_of(st)
    shadow = next(e for e in st["engines"] if e["role"] == "shadow")
    os.kill(old["pid"], signal.SIGKILL)  # the API server only: its worker lingers
    st = await admin.wait(
        lambda s: bool(s["failovers"]) and s["failovers"][0]["result"] != "in_progress",
        what="failover result",
    )
    rec = st["failovers"][0]
    assert rec["result"] == "promoted", (rec, admin.sup.logs()[-2000:])
    assert rec["steps"]["memory_release"] >= 0.6
    log = Path(admin.sup.config_path).parent / "state" / "logs" / f"{shadow['id']}.log"
    assert "out of memory" not in log.read_text()


async def test_admin_switchover_drain_and_manual_failover(
    daemon: Any, session: aiohttp.ClientSession
) -> None:
    admin = await daemon()
    st = await admin.status()
    shadow = next(e for e in st["engines"] if e["role"] == "shadow")
    status, body = await admin.post("/switchover", {"slot": "s", "to": shadow["id"]})
    assert status == 200 and body["result"] == "promoted", body
    st = await admin.wait(full_strength, what="full strength after switchover")
    assert slot_of(st)["epoch"] == 2 and slot_of(st)["active"] == shadow["id"]

    status, body = await admin.post("/drain", {"engine": shadow["id"]})
    assert status == 200
    st = await admin.wait(
        lambda s: slot_of(s)["epoch"] == 3 and full_strength(s), what="drain of the active"
    )
    assert engine_of(st, shadow["id"])["state"] == "stopped"

    victim = active_of(st)["id"]
    status, _ = await admin.post("/failover", {"engine": victim})
    assert status == 200
    st = await admin.wait(lambda s: slot_of(s)["epoch"] == 4, what="manual failover")
    assert st["failovers"][0]["reason"].startswith("admin")

    for path, body, want in [
        ("/failover", {"engine": "nope"}, 404),
        ("/failover", {}, 400),
        ("/switchover", {"slot": "nope"}, 404),
        ("/switchover", {"slot": "s", "to": victim}, 409),  # not a sleeping shadow
        ("/drain", [1, 2], 400),
    ]:
        status, answer = await admin.post(path, body)
        assert status == want, (path, body, answer)
        assert "message" in answer["error"]


async def test_two_slots_fail_over_independently(
    daemon: Any, session: aiohttp.ClientSession
) -> None:
    admin = await daemon(sim_slot("a", gpus=["0"]), sim_slot("b", gpus=["1"]))
    st = await admin.status()
    os.killpg(active_of(st, "a")["pid"], signal.SIGKILL)
    st = await admin.wait(lambda s: slot_of(s, "a")["epoch"] == 2, what="slot a failover")
    assert slot_of(st, "b")["epoch"] == 1
    assert await complete(session, active_of(st, "b")["url"]) == 200


# -- a third-party plugin that raises ----------------------------------------------------
RAISING_PLUGIN = '''
from plugins.vllm import VllmBackend
from supervisor.openai_shapes import OpenAIStreamDecoder


class RaisingBackend(VllmBackend):
    """Behaves like vLLM but its wake hook raises, as a buggy plugin might."""

    async def wake(self, ep, tags=()):
        raise RuntimeError("plugin bug in wake")


class BuggyDecoder(OpenAIStreamDecoder):
    def __init__(self):
        super().__init__()
        self.events = 0

    def feed(self, data):
        self.events += 1
        if self.events > 3:
            raise KeyError("plugin bug in the decoder")
        return super().feed(data)


class BuggyStreamsBackend(VllmBackend):
    """vLLM, but its decoder breaks on prompts that ask for it and its abort hook raises."""

    def decoder(self, upstream):
        if "break the decoder" in str(upstream.body.get("prompt")):
            return BuggyDecoder()
        return super().decoder(upstream)

    async def abort(self, ep, request_id):
        raise RuntimeError("plugin bug in abort")
'''


def install_fake_distribution(site: Path) -> None:
    """A real installed distribution (dist-info + entry point) without pip."""
    site.mkdir(parents=True)
    (site / "raising_backend.py").write_text(RAISING_PLUGIN)
    info = site / "raising_backend-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: raising-backend\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[failover_supervisor.backends]\nraising = raising_backend:RaisingBackend\n"
        "buggy-streams = raising_backend:BuggyStreamsBackend\n"
    )


async def with_buggy_plugin(daemon: Any, tmp_path: Path, backend: str, **kw: Any) -> Admin:
    """A daemon whose slot uses one of the buggy backends installed above."""
    site = tmp_path / "site"
    install_fake_distribution(site)
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    slot = sim_slot("s", dialect="vllm", backend=backend)
    return await daemon(slot, env={"PYTHONPATH": path}, **kw)  # type: ignore[no-any-return]


async def test_a_plugin_that_raises_is_contained(
    daemon: Any, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    admin = await with_buggy_plugin(daemon, tmp_path, "raising", failover={"relaunch_backoff": 1.0})
    os.killpg(active_of(await admin.status())["pid"], signal.SIGKILL)
    st = await admin.wait(
        lambda s: bool(s["failovers"]) and s["failovers"][0]["result"] != "in_progress",
        what="failover attempt",
    )
    assert st["failovers"][0]["result"] in ("degraded", "error")
    assert slot_of(st)["degraded"]
    assert (
        'failover_supervisor_plugin_errors_total{backend="vllm",hook="wake"}'
        in await admin.metrics()
    )
    assert "plugin bug in wake" in admin.sup.logs()
    assert admin.sup.proc.poll() is None  # the daemon is still up
    # Every new shadow loads, is woken for the degraded slot and fails again: the relaunches
    # back off (1 s, doubling), so 8 s bring two or three launches, never a storm (a shadow
    # that loaded used to reset the backoff: 17 launches in 8 s; once 276 in 124 s).
    await anyio.sleep(8)
    text = await admin.metrics()
    line = next(x for x in text.splitlines() if x.startswith("failover_supervisor_engine_rel"))
    relaunches = float(line.rsplit(" ", 1)[1])
    assert 1 <= relaunches <= 3, line
    assert slot_of(await admin.status())["degraded"]


async def test_decoder_and_abort_hooks_that_raise_are_contained(
    daemon: Any, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    admin = await with_buggy_plugin(daemon, tmp_path, "buggy-streams")
    url = admin.sup.frontend_url + "/v1/completions"
    body = {"model": "sim-model", "prompt": "break the decoder", "max_tokens": 20, "stream": True}
    # The decoder raises mid-stream: the client gets an error event and [DONE], not a hang
    # or a bare 500; the engine is not blamed.
    async with session.post(url, json=body) as r:
        events = [json.loads(d) async for d in iter_sse_data(r)]
    assert "decoder failed" in events[-1]["error"]["message"]
    # A client that hangs up: the abort hook raises, the request still ends.
    body = {"model": "sim-model", "prompt": "the river", "max_tokens": 2000, "stream": True}
    async with session.post(url, json=body) as r:
        async for _ in iter_sse_data(r):
            break
    text = ""
    with anyio.fail_after(10):
        while 'hook="abort"' not in text:
            text = await admin.metrics()
            await anyio.sleep(0.1)
    assert 'failover_supervisor_plugin_errors_total{backend="vllm",hook="decoder"}' in text
    assert "plugin bug in the decoder" in admin.sup.logs()
    assert "Traceback" in admin.sup.logs()  # the plugin author gets the traceback
    st = await admin.status()
    assert st["failovers"] == [] and slot_of(st)["phase"] == "serving"
    assert admin.sup.proc.poll() is None


async def test_status_command_prints_the_table(daemon: Any) -> None:
    admin = await daemon()
    out = await anyio.run_process(
        [sys.executable, "-m", "supervisor", "status", "--admin", admin.sup.admin_url]
    )
    text = out.stdout.decode()
    assert "node test-node  ready=True" in text
    assert "s-1" in text and "sleeping" in text and "active" in text


async def test_on_exit_leave_keeps_engines_running(tmp_path: Path) -> None:
    sup = await start_supervisor(tmp_path, [sim_slot("s", shadows=0)], node={"on_exit": "leave"})
    async with aiohttp.ClientSession() as s, s.get(sup.admin_url + "/status") as r:
        pid = (await r.json())["engines"][0]["pid"]
    assert await anyio.to_thread.run_sync(sup.stop) == 0
    try:
        assert process_start_time(pid) is not None  # still running after the daemon left
    finally:
        os.killpg(pid, signal.SIGKILL)


async def test_an_engine_that_cannot_start_degrades_its_slot(tmp_path: Path) -> None:
    """A vllm on PATH that cannot be executed: the slot degrades with the reason; the
    daemon keeps running and shows no traceback."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "vllm"
    shim.write_text("#!/nonexistent/interpreter\n")
    shim.chmod(0o755)
    slot = {"name": "s", "model": "m", "backend": "vllm", "base_port": 19931, "shadows": 0}
    env = {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    sup = await start_supervisor(tmp_path / "sup", [slot], env=env)
    try:
        async with aiohttp.ClientSession() as s, s.get(sup.admin_url + "/status") as r:
            st = await r.json()
        assert st["slots"][0]["degraded"]
        assert "cannot start engine s-" in st["slots"][0]["degraded_reason"]
        # It keeps trying, with backoff: a new attempt may be launching right now.
        states = {e["state"] for e in st["engines"] + st["retired_engines"]}
        assert "failed" in states and states <= {"failed", "launching"}, states
        assert "Traceback" not in sup.logs()
    finally:
        assert await anyio.to_thread.run_sync(sup.stop) == 0


async def test_active_failing_at_start_is_replaced_by_the_ready_shadow(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    slot = sim_slot("s")
    base = int(slot["base_port"])
    import socket

    with socket.socket() as squatter:  # the active engine (second port) cannot bind
        squatter.bind(("127.0.0.1", base + 1))
        squatter.listen()
        sup = await start_supervisor(tmp_path, [slot])
        try:
            admin = Admin(sup, session)
            st = await admin.wait(
                lambda s: slot_of(s)["active"] is not None, what="the shadow promoted"
            )
            assert active_of(st)["url"].endswith(f":{base}")  # the shadow's port
            assert await complete(session, active_of(st)["url"]) == 200
        finally:
            squatter.close()
            assert await anyio.to_thread.run_sync(sup.stop) == 0


async def test_admin_token_and_frontend_api_key(tmp_path: Path) -> None:
    (tmp_path / "admin-token").write_text("s3cret-admin\n")
    (tmp_path / "api-key").write_text("s3cret-client\n")
    sup = await start_supervisor(
        tmp_path / "sup",
        [sim_slot("s")],
        admin={"token_file": str(tmp_path / "admin-token")},
        frontend={"api_key_file": str(tmp_path / "api-key")},
    )
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(sup.admin_url + "/status") as r:
                assert r.status == 200  # reading needs no token
                engine = (await r.json())["engines"][0]["id"]
            async with s.post(sup.admin_url + "/drain", json={"engine": engine}) as r:
                assert r.status == 401
            async with s.post(
                sup.admin_url + "/drain",
                json={"engine": engine},
                headers={"Authorization": "Bearer wrong"},
            ) as r:
                assert r.status == 401
            async with s.post(
                sup.admin_url + "/drain",
                json={"engine": engine},
                headers={"Authorization": "Bearer s3cret-admin"},
            ) as r:
                assert r.status == 200
            body = {"model": "sim-model", "prompt": "x", "max_tokens": 2}
            async with s.post(sup.frontend_url + "/v1/completions", json=body) as r:
                assert r.status == 401
                assert (await r.json())["error"]["code"] == "invalid_api_key"
            async with s.post(
                sup.frontend_url + "/v1/completions",
                json=body,
                headers={"Authorization": "Bearer s3cret-client"},
            ) as r:
                assert r.status == 200
            async with s.get(sup.frontend_url + "/health") as r:
                assert r.status == 200
    finally:
        assert await anyio.to_thread.run_sync(sup.stop) == 0
    logs = sup.logs() + sup.stdout_path.read_text()
    assert "s3cret" not in logs
