"""The CLI's commands that talk to the admin API (status, reload, pause, resume,
switchover, rollout, drain): each one admin API call, its answer said in a line or two; a
rollout's progress is followed until it ends. Exit status: 0 done, 1 refused or failed, 2 the
admin API cannot be reached (or a bad argument)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta
from datetime import time as time_of_day
from pathlib import Path
from typing import Any


class AdminUnreachable(Exception):
    pass


def _call(ns: argparse.Namespace, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    """One admin API call: (HTTP status, JSON answer)."""
    url = ns.admin.rstrip("/") + path
    headers = {"Content-Type": "application/json"}
    if getattr(ns, "token_file", ""):
        try:
            headers["Authorization"] = "Bearer " + Path(ns.token_file).read_text().strip()
        except OSError as e:
            raise AdminUnreachable(
                f"cannot read the token file {ns.token_file}: {e.strerror}"
            ) from e
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, headers=headers, method="GET" if data is None else "POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read() or b"{}")
        except ValueError:
            return e.code, {"error": {"message": e.reason}}
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise AdminUnreachable(f"cannot reach the admin API at {ns.admin}: {e}") from e


def _say_error(answer: Any) -> None:
    err = answer.get("error", {}) if isinstance(answer, dict) else {}
    print(f"failover-supervisor: {err.get('message', answer)}", file=sys.stderr)
    for p in err.get("problems") or []:
        print(f"  {p}", file=sys.stderr)


def _guarded(fn: Any) -> Any:
    def run(ns: argparse.Namespace) -> int:
        try:
            return int(fn(ns))
        except AdminUnreachable as e:
            print(f"failover-supervisor: {e}", file=sys.stderr)
            return 2

    return run


def _reload(ns: argparse.Namespace) -> int:
    status, answer = _call(ns, "/reload", {})
    if status != 200:
        _say_error(answer)
        return 1
    changes = answer["changes"]
    if not changes:
        print("reloaded: no changes")
    for c in changes:
        print(f"{c['effect']:8} {c['key']}: {c['old']!r} -> {c['new']!r}")
    if answer["rollout_pending"]:
        print(f"to roll out: {', '.join(answer['rollout_pending'])} (failover-supervisor rollout)")
    if answer["restart_needed"]:
        print(f"needs a restart: {', '.join(answer['restart_needed'])}")
    return 0


@_guarded
def reload(ns: argparse.Namespace) -> int:
    return _reload(ns)


@_guarded
def pause(ns: argparse.Namespace) -> int:
    body: dict[str, Any] = {"reason": ns.reason}
    if ns.slot:
        body["slot"] = ns.slot
    if ns.duration is not None:
        body["for"] = ns.duration
    status, answer = _call(ns, "/pause", body)
    if status != 200:
        _say_error(answer)
        return 1
    what = f"slot {ns.slot}" if ns.slot else f"node {answer['node']}"
    until = answer["paused"]["until"]
    end = time.strftime(" until %Y-%m-%d %H:%M:%S", time.localtime(until)) if until else ""
    print(f"{what} paused{end}: no automatic failover or relaunch ({ns.reason})")
    return 0


@_guarded
def resume(ns: argparse.Namespace) -> int:
    status, answer = _call(ns, "/resume", {"slot": ns.slot} if ns.slot else {})
    if status != 200:
        _say_error(answer)
        return 1
    print(f"resumed {answer['resumed']}: automatic failover and relaunch are on again")
    return 0


@_guarded
def switchover(ns: argparse.Namespace) -> int:
    if ns.cancel:
        status, answer = _call(ns, "/switchover/cancel", {"slot": ns.slot})
        if status != 200:
            _say_error(answer)
            return 1
        at = _clock(answer["cancelled"]["at"])
        print(f"cancelled the switchover of slot {ns.slot} scheduled for {at}")
        return 0
    body: dict[str, Any] = {"slot": ns.slot}
    if ns.to:
        body["to"] = ns.to
    if ns.at is not None:
        body["at"] = ns.at
    if ns.after is not None:
        body["after"] = ns.after
    status, answer = _call(ns, "/switchover", body)
    if status == 202:
        print(f"switchover of slot {ns.slot} scheduled for {_clock(answer['scheduled']['at'])}")
        return 0
    if status != 200:
        if "result" in answer:
            print(f"switchover of slot {ns.slot}: {answer['result']} {answer.get('detail', '')}")
        else:
            _say_error(answer)
        return 1
    print(
        f"slot {ns.slot} switched over to {answer['promoted_engine']} at epoch {answer['epoch']}; "
        f"{answer['moved_streams']} stream(s) moved"
    )
    return 0


@_guarded
def rollout(ns: argparse.Namespace) -> int:
    if not ns.no_reload and _reload(ns):
        return 1
    _, st = _call(ns, "/status")
    names = ns.slots or [s["name"] for s in st["slots"] if s.get("rollout_pending")]
    t0 = time.time()
    status, answer = _call(ns, "/rollout", {"slots": ns.slots})
    if status != 202:
        _say_error(answer)
        return 1
    said: dict[str, int] = {}  # steps printed, per slot
    ours: dict[str, dict[str, Any]] = {}
    while True:
        _, st = _call(ns, "/status")
        for s in st["slots"]:
            r = s.get("rollout")
            if s["name"] not in names or r is None or r["started_at"] < t0 - 1:
                continue
            ours[s["name"]] = r
            for h in r["history"][said.get(s["name"], 0) :]:
                at = time.strftime("%H:%M:%S", time.localtime(h["at"]))
                print(f"[{at}] slot {s['name']}: {h['step']}", flush=True)
            said[s["name"]] = len(r["history"])
        # Slots roll one after another with no gap: none in progress means it has ended.
        if not any(r["result"] == "in_progress" for r in ours.values()):
            break
        time.sleep(0.5)
    for n in names:
        r = ours.get(n)
        if r is None:
            print(f"slot {n}: not rolled out (an earlier slot did not finish)")
        else:
            print(f"slot {n}: {r['result']}" + (f" ({r['reason']})" if r["reason"] else ""))
    return 0 if len(ours) == len(names) and all(r["result"] == "done" for r in ours.values()) else 1


@_guarded
def drain(ns: argparse.Namespace) -> int:
    body: dict[str, Any] = {"engine": ns.engine}
    if ns.limit is not None:
        body["limit"] = ns.limit
    status, answer = _call(ns, "/drain", body)
    if status != 200:
        _say_error(answer)
        return 1
    print(f"drained {ns.engine}: stopped, its streams finished or moved")
    _, st = _call(ns, "/status")
    gone = next((e for e in st.get("retired_engines", []) if e["id"] == ns.engine), None)
    slot = next((s for s in st["slots"] if gone and s["name"] == gone["slot"]), None)
    if slot is not None:
        print(f"slot {slot['name']}: active {slot['active'] or '-'} at epoch {slot['epoch']}")
    return 0


@_guarded
def status(ns: argparse.Namespace) -> int:
    code, st = _call(ns, "/status")
    if code != 200:
        _say_error(st)
        return 1
    if ns.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"node {st['node']}  ready={st['ready']}  uptime {st['uptime_s']:.0f}s")
    node_pause = st.get("paused")
    if node_pause:
        print(f"node paused {_pause_end(node_pause)}: {node_pause['reason']}")
    print(f"\n{'SLOT':16} {'MODEL':24} {'EPOCH':>5} {'GEN':>4}  {'ACTIVE':16} STATE")
    for s in st["slots"]:
        state = f"degraded: {s['degraded_reason']}" if s["degraded"] else "serving"
        print(
            f"{s['name']:16} {s['model']:24} {s['epoch']:>5} {s.get('generation', 0):>4}  "
            f"{s['active'] or '-':16} {state}"
        )
    # What an operator set in motion or left behind, one line each (the node's own pause
    # is said above, not again for every slot it covers).
    notes = [n for s in st["slots"] for n in _slot_notes(s, node_pause)]
    if notes:
        print()
        for n in notes:
            print(n)
    print(
        f"\n{'ENGINE':16} {'SLOT':16} {'ROLE':7} {'STATE':10} {'PID':>8} {'GEN':>4}  "
        f"{'URL':24} GPUS"
    )
    for eng in st["engines"]:
        print(
            f"{eng['id']:16} {eng['slot']:16} {eng['role']:7} {eng['state']:10} "
            f"{eng['pid'] or '-':>8} {eng.get('generation', 0):>4}  {eng['url']:24} "
            f"{','.join(eng['gpus'])}"
        )
    cl = st.get("cluster")
    if cl:
        etcd = "reachable" if cl["etcd_reachable"] else "UNREACHABLE"
        nats = {True: "connected", False: "DISCONNECTED", None: "not used"}[cl["nats_connected"]]
        print(
            f"\ncluster {cl['name']}  leader {cl['leader'] or '-'}"
            f"{' (this node)' if cl['is_leader'] else ''}  etcd {etcd}  nats {nats}"
        )
        peers = "  ".join(f"{n}={state}" for n, state in cl["peers"].items()) or "none"
        print(f"peers: {peers}")
        for name, rec in cl["slots"].items():
            print(f"  slot {name}: epoch {rec['epoch']}, {rec['active'] or '-'} ({rec['reason']})")
    if st["failovers"]:
        print(f"\n{'SLOT':16} {'RESULT':9} {'FAILED':16} {'PROMOTED':16} STEPS (ms)   REASON")
        for f in st["failovers"][:10]:
            steps = " ".join(f"{k}={v * 1000:.0f}" for k, v in f["steps"].items())
            print(
                f"{f['slot']:16} {f['result']:9} {f['failed_engine'] or '-':16} "
                f"{f['promoted_engine'] or '-':16} {steps:12} {f['reason']}"
            )
    return 0


def _slot_notes(s: dict[str, Any], node_pause: dict[str, Any] | None) -> list[str]:
    name = s["name"]
    notes = []
    pause = s.get("paused")
    if pause and pause != node_pause:
        notes.append(f"slot {name}: paused {_pause_end(pause)}: {pause['reason']}")
    plan = s.get("scheduled_switchover")
    if plan:
        to = plan["to"] or "the first shadow asleep"
        notes.append(
            f"slot {name}: switchover to {to} scheduled for {_clock(plan['at'])} "
            f"(in {span(plan['at'] - time.time())})"
        )
    if s.get("rollout_pending"):
        keys = ", ".join(s["rollout_pending"])
        notes.append(f"slot {name}: rollout pending ({keys}): failover-supervisor rollout")
    r = s.get("rollout")
    if r:
        gens = f"generation {r['from_generation']} -> {r['to_generation']}"
        if r["result"] == "in_progress":
            notes.append(f"slot {name}: rollout in progress ({gens}): {r['step']}")
        else:
            why = f" ({r['reason']})" if r["reason"] else ""
            at = _clock(r["finished_at"] or r["started_at"])
            notes.append(f"slot {name}: last rollout {r['result']}{why} at {at} ({gens})")
    return notes


def _pause_end(p: dict[str, Any]) -> str:
    if p.get("until") is None:
        return "until resumed"
    return f"until {_clock(p['until'])} (in {span(p['until'] - time.time())})"


def span(seconds: float) -> str:
    """A duration as an operator reads it: 40 s, 12 min, 3 h 5 min, 2 days 4 h."""
    s = max(0, int(seconds))  # down: 599.7 s to go is "9 min", as a clock shows it
    if s < 120:
        return f"{s} s"
    m = s // 60
    if m < 120:
        return f"{m} min"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(h, 24)
    return f"{d} days {h} h" if h else f"{d} days"


def at_time(text: str) -> float:
    """``--at``, read in this machine's local time: a time of day (``03:00``: the next one),
    a date and time in ISO 8601 (``2027-01-15T03:00``, with an offset if wanted) or Unix
    seconds. Whether it is in the past is the admin API's to say (one rule for every
    client)."""
    t = text.strip()
    try:
        secs = float(t)
    except ValueError:
        pass
    else:
        if math.isfinite(secs):
            return secs
        raise argparse.ArgumentTypeError(f"not a time: {text!r}")
    try:
        of_day = time_of_day.fromisoformat(t)
    except ValueError:
        pass
    else:
        now = datetime.now().astimezone()
        when = datetime.combine(now.date(), of_day)
        when = when.astimezone() if when.tzinfo is None else when
        if when <= now:
            when = datetime.combine(now.date() + timedelta(days=1), of_day)
            when = when.astimezone() if when.tzinfo is None else when
        return when.timestamp()
    try:
        parsed = datetime.fromisoformat(t)
        return (parsed.astimezone() if parsed.tzinfo is None else parsed).timestamp()
    except (ValueError, OverflowError, OSError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: give a time of day (03:00), a date and time "
            "(2027-01-15T03:00) or Unix seconds"
        ) from None


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
