"""The operator commands of the CLI (reload, pause, resume, switchover, rollout): each one
admin API call, its answer said in a line or two; a rollout's progress is followed until
it ends. Exit status: 0 done, 1 refused or failed, 2 the admin API cannot be reached."""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
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
    if ns.at:
        body["at"] = float(ns.at) if ns.at.replace(".", "", 1).isdigit() else ns.at
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


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))
