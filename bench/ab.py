"""The relay's CPU in this checkout against another revision's, side by side, in one run.

    .venv/bin/python -m bench.ab [BASE] [--phase ns|itl0|itl10] [--rounds 16] [--json FILE]

For a change to the relay whose effect is a few percent: on a 2-core machine the CPU a
daemon spends per token or per request moves by more than that from one minute to the
next, so two runs made one after the other (or two phases of ``.venv/bin/python -m bench.peers``)
cannot show it. Here two daemons run at once, each with a simulated engine of its own:
``this`` runs the working tree, ``base`` runs revision ``BASE`` (default ``HEAD``: the
working tree's uncommitted changes against the last commit), checked out into a temporary
git worktree and its relay compiled there as the set-up commands compile this one's. The
same load goes through each in turn, the order alternating every round, so a slow spell
of the machine falls on both; what counts is the ratio within each round.

Phases: ``ns`` (sequential non-streaming requests of 8 tokens, engine at ITL 0; CPU per
request), ``itl0`` (4 streams, engine at ITL 0) and ``itl10`` (64 streams, a token every
10 ms; both CPU per token). Prints a line per round and at the end the median of each
side and the median of the rounds' ratios base/this (above 1: this checkout spends less)
with their middle half. Run it once with the same revision on both sides (``HEAD`` and a
clean working tree) to see the machine's noise floor: on a 2-core machine a median within
a few percent of 1 is not a difference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import anyio

from bench.peers import (
    ProxyPath,
    Tally,
    engine_slot,
    non_streaming,
    progress,
    relay_and_engines,
    start_relay_daemon,
    streams,
)
from supervisor.testing.cluster import SupervisorProcess
from supervisor.testing.gpuledger import LEDGER_ENV

ROOT = Path(__file__).resolve().parent.parent
PHASES = {  # phase -> (engine timing, streams (0: non-streaming), tokens or requests a round)
    "ns": ("itl0", 0, 500),
    "itl0": ("itl0", 4, 1500),
    "itl10": ("itl10", 64, 200),
}


class AbError(Exception):
    """The comparison cannot be set up (no git checkout, an unknown revision, a failed
    build): said in one line, without a traceback."""


def _git(*args: str) -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False
        )
    except FileNotFoundError as e:
        raise AbError("git is not installed") from e
    if done.returncode != 0:
        raise AbError(f"git {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done.stdout.strip()


def checkout(rev: str, into: Path) -> str:
    """Check ``rev`` out into ``into`` (a detached worktree) and compile its relay; returns
    the commit's short name."""
    try:
        commit = _git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except AbError as e:
        raise AbError(f"{rev!r} is not a commit of this repository ({ROOT})") from e
    _git("worktree", "add", "--detach", "--force", str(into), commit)
    progress(f"base: {rev} ({commit[:10]}) checked out in {into}; compiling its relay...")
    build = into / "scripts" / "build_native.py"
    if build.exists():  # (a revision from before the compiled relay runs pure Python)
        done = subprocess.run(
            [sys.executable, str(build)], cwd=into, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise AbError(f"compiling the base's relay failed:\n{done.stdout}{done.stderr}")
    return commit[:10]


def remove_checkout(into: Path) -> None:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(into)],
        capture_output=True,
        check=False,
    )
    shutil.rmtree(into, ignore_errors=True)


@dataclass
class Side:
    """One daemon of the comparison and its rounds (CPU µs per token or per request)."""

    name: str
    sup: SupervisorProcess
    model: str
    per_round: list[float] = field(default_factory=list)

    @property
    def path(self) -> ProxyPath:
        return ProxyPath(
            self.name, {self.model: self.sup.frontend_url}, {self.model: self.sup.proc.pid}
        )


async def start_side(name: str, model: str, work: Path, source: Path) -> Side:
    sup = await start_relay_daemon(
        work,
        [engine_slot(model, 0)],
        log_level="warning",
        env={LEDGER_ENV: str(work / "gpu-ledger.json")},
        source=source,
    )
    return Side(name, sup, model)


async def one_round(session: aiohttp.ClientSession, side: Side, phase: str) -> tuple[float, int]:
    """CPU µs per unit for one round through ``side``, and its errors."""
    _, n, count = PHASES[phase]
    t: Tally
    if n == 0:
        t = await non_streaming(session, side.path, side.model, count)
        return t.cpu / max(t.requests, 1) * 1e6, t.errors
    t = await streams(session, side.path, side.model, n, count)
    return t.cpu / max(t.tokens, 1) * 1e6, t.errors


async def compare(base_rev: str, phase: str, rounds: int) -> dict[str, Any]:
    model = PHASES[phase][0]
    work = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    base_tree = work / "base-checkout"
    sides: list[Side] = []
    try:
        commit = await anyio.to_thread.run_sync(checkout, base_rev, base_tree)
        sides.append(await start_side("this", model, work / "this", ROOT))
        sides.append(await start_side("base", model, work / "base", base_tree))
        errors = 0
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=300)
        ) as session:
            for s in sides:
                relay, _ = await relay_and_engines(session, s.sup)
                progress(f"{s.name}: relay {relay}")
            for s in sides:  # warm-up, uncounted
                await one_round(session, s, phase)
            for rnd in range(rounds):
                for s in sides if rnd % 2 == 0 else sides[::-1]:
                    cpu, err = await one_round(session, s, phase)
                    s.per_round.append(cpu)
                    errors += err
                this, base = sides
                progress(
                    f"round {rnd + 1}/{rounds}: this {this.per_round[-1]:.2f}, "
                    f"base {base.per_round[-1]:.2f} µs/{unit(phase)}"
                )
        this, base = sides
        ratios = [b / a for a, b in zip(this.per_round, base.per_round, strict=True) if a > 0]
        return {
            "phase": phase,
            "unit": unit(phase),
            "base": f"{base_rev} ({commit})",
            "rounds": rounds,
            "errors": errors,
            "this_median": round(statistics.median(this.per_round), 2),
            "base_median": round(statistics.median(base.per_round), 2),
            "ratio_base_over_this": [round(r, 3) for r in ratios],
            "median_ratio": round(statistics.median(ratios), 3),
            # The middle half of the rounds' ratios: how far one round's can stray.
            "ratio_quartiles": [
                round(q, 3)
                for q in (statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else ratios * 2)
            ],
        }
    finally:
        for s in sides:
            await anyio.to_thread.run_sync(s.sup.stop)
        await anyio.to_thread.run_sync(remove_checkout, base_tree)
        shutil.rmtree(work, ignore_errors=True)


def unit(phase: str) -> str:
    return "request" if PHASES[phase][1] == 0 else "token"


def main() -> int:
    ap = argparse.ArgumentParser(
        prog=".venv/bin/python -m bench.ab",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    ap.add_argument("base", nargs="?", default="HEAD", help="git revision to compare against")
    ap.add_argument("--phase", choices=sorted(PHASES), default="ns")
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--json", type=Path, help="also write the result here")
    ns = ap.parse_args()
    if ns.rounds < 1:
        ap.error("--rounds must be at least 1")
    try:
        out = anyio.run(compare, ns.base, ns.phase, ns.rounds)
    except AbError as e:
        print(f"bench.ab: {e}", file=sys.stderr)
        return 2
    print(
        f"{out['phase']}: this {out['this_median']} / base {out['base_median']} µs per "
        f"{out['unit']} (medians of {out['rounds']} rounds, {out['errors']} errors); "
        f"base/this per round, median {out['median_ratio']}, middle half "
        f"{out['ratio_quartiles'][0]}-{out['ratio_quartiles'][1]} (above 1: this spends less; "
        "the same revision on both sides is the noise floor)"
    )
    if ns.json:
        ns.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
