"""The docs work as printed: every shell block of README.md and docs/*.md runs, as a reader
types it after the README's set-up, and exits 0.

Conventions, for whoever writes the docs:

- A shell block is a fenced block marked ``sh``, ``bash`` or ``shell``. Its commands run in
  order in one ``bash -eE -o pipefail``, in a copy of the checkout (``examples/`` copied,
  the rest linked), with ``failover-supervisor`` on PATH as the set-up links it (this
  checkout's code) and ``.venv`` the environment running the tests.
- ``<!-- docs-test: skip (REASON) -->`` on the line before a block leaves it out, with the
  reason: for root-only blocks (systemctl, /etc, apt, sudo), ones that install packages or
  run the set-up, need a GPU or real engines, or run for long (the demo, the benchmarks;
  the demo has a test of its own). The reason is required. A block that runs the set-up
  (``scripts/*.sh``), installs, or acts as root without the marker fails the test before
  anything runs.
- A command that serves until stopped (``failover-supervisor run``, ``failover-supervisor
  sim-engine``) is started in the background, as a reader starts it in a terminal of its
  own; the commands after it run once it is up (the daemon has printed ``ready``, a
  simulated engine answers on its ``--port``). It is stopped with SIGTERM at the end of the
  file and must exit 0.
- A file whose blocks talk to a daemon (its admin API or frontend: ports 8470 and 8080,
  ``failover-supervisor status``, ``pause``, ...) without a ``failover-supervisor run`` of
  their own talk to the README's example daemon: ``failover-supervisor run --config
  examples/sim-single-node.toml``, started fresh for that file.
- A ``text`` block right after a shell block (blank lines only between) shows what the
  block prints: each of its non-blank lines must be found in the output, in order, within
  a line; ``...`` stands for any text. A daemon started by the block adds what it printed
  until ready.

Everything runs in a network namespace of its own, so the docs' ports (8080, 8470, the
engines' 18001...) are free even beside other tests and daemons on this machine; without
root to make one, the test skips.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from supervisor.testing.netns import namespace_unavailable

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = ("sh", "bash", "shell")
MARKER = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")
FENCE = re.compile(r"^```(\S*)\s*$")
SERVES = re.compile(r"^(?:\w+=\S+\s+)*failover-supervisor\s+(run|sim-engine)\b")
EXAMPLE_DAEMON = "failover-supervisor run --config examples/sim-single-node.toml"
# What a block may not do unmarked: run the set-up or the suite, install, act as root. The
# copy's .venv is the environment running these tests, so the set-up run from it would
# reinstall the package into that environment, pointing it at the copy.
CHANGES_MACHINE = re.compile(
    r"scripts/(bootstrap|test|demo|real-engines|link_cli)\.sh|\bpip3? install\b|\bapt(-get)? "
    r"|\bsudo(edit)?\b|\bsystemctl\b|\bjournalctl\b|(^|\s)/etc/|\.venv/bin/pip\b"
)
# A command that talks to a daemon: its admin API or frontend, by port or by CLI command.
TALKS = re.compile(
    r":8470|:8080|failover-supervisor\s+(status|reload|pause|resume|switchover|rollout|drain)\b"
)


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    skip: str | None = None  # the reason
    output: str | None = None  # the text block that follows, if any

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def commands(self) -> list[str]:
        """The block's commands, continuation lines joined, comment-only lines dropped."""
        joined = re.sub(r"\\\n\s*", " ", self.text)
        return [c for c in joined.splitlines() if c.strip() and not c.lstrip().startswith("#")]


def blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path``, with its skip marker and following output block."""
    lines = path.read_text().splitlines()
    found: list[Block] = []
    i = 0
    last_closed = -10  # line index where the last block closed
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        before = next((x for x in reversed(lines[:start]) if x.strip()), "")
        marker = MARKER.search(before)
        skip = None
        if marker:
            skip_m = re.fullmatch(r"skip\s*\((.+)\)", marker.group(1))
            assert skip_m, f"{path}:{start}: a marker reads 'docs-test: skip (REASON)'"
            skip = skip_m.group(1)
        block = Block(path, start + 1, m.group(1), "\n".join(lines[start + 1 : j]), skip)
        between = lines[last_closed + 1 : start]
        if (
            block.lang == "text"
            and found
            and found[-1].lang in SHELLS
            and all(not x.strip() for x in between)
        ):
            found[-1].output = block.text
        found.append(block)
        last_closed = j
        i = j + 1
    return found


def shell_blocks(path: Path) -> list[Block]:
    return [b for b in blocks(path) if b.lang in SHELLS]


def expect(shown: str, got: str) -> list[str]:
    """The lines of ``shown`` not found in ``got`` (in order, ``...`` for any text)."""
    out = got.splitlines()
    at, missing = 0, []
    for want in (x.strip() for x in shown.splitlines()):
        if not want:
            continue
        pattern = re.compile(".*".join(re.escape(p.strip()) for p in want.split("...")))
        k = next((k for k in range(at, len(out)) if pattern.search(out[k])), None)
        if k is None:
            missing.append(want)
        else:
            at = k + 1
    return missing


# -- the conventions, checked without running anything ---------------------------------


def test_every_skipped_block_says_why_and_no_runnable_one_changes_the_machine() -> None:
    for path in DOCS:
        for b in blocks(path):
            if b.skip is not None:
                assert b.lang in SHELLS and len(b.skip) > 10, b.where
            elif b.lang in SHELLS:
                refuse_machine_changes(b)


def refuse_machine_changes(b: Block) -> None:
    bad = [c for c in b.commands() if CHANGES_MACHINE.search(c)]
    assert not bad, (
        f"{b.where}: {bad[0]!r} would change this machine: mark the block "
        "<!-- docs-test: skip (REASON) -->"
    )


def test_one_spelling_for_the_cli_and_the_benchmarks() -> None:
    """``failover-supervisor`` (on PATH after the set-up), never ``.venv/bin/...``, and
    ``.venv/bin/python -m bench`` (run from the checkout), never a bare ``python``."""
    texts = list(DOCS)
    texts += [*(ROOT / "systemd").rglob("*.service*"), *(ROOT / "systemd").rglob("*.example")]
    texts += [*(ROOT / "examples").rglob("*.toml"), *(ROOT / "bench").glob("*.py")]
    for path in texts:
        if path.is_dir():
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not re.search(r"\.venv/bin/failover-supervisor\s+[a-z]", line), f"{path}:{n}"
            assert not re.search(r"(?<![\w/.])python3? -m bench", line), f"{path}:{n}"


# -- running them --------------------------------------------------------------------------


@dataclass
class Background:
    command: str
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def text(self) -> str:
        return self.out.read_text(errors="replace")


@dataclass
class Reader:
    """A reader's machine: a network namespace, a copy of the checkout, a PATH."""

    ns: str
    cwd: Path
    env: dict[str, str]
    logs: Path
    background: list[Background] = field(default_factory=list)

    def argv(self, script: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, "bash", "-eE", "-o", "pipefail", "-c", script]

    def run(self, commands: list[str], where: str) -> str:
        # The failing command, named: bash's ERR trap sees it before -e ends the script.
        trap = "trap 'echo \"docs-test: exit $? from: $BASH_COMMAND\" >&2' ERR\n"
        proc = subprocess.Popen(
            self.argv(trap + "\n".join(commands)),
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # on a timeout, all it started goes with it
        )
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise AssertionError(f"{where}: still running after 60 s\n{stderr[-3000:]}") from None
        out = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        assert out.returncode == 0, (
            f"{where}: exit {out.returncode}\n--- stdout\n{out.stdout[-3000:]}\n"
            f"--- stderr\n{out.stderr[-3000:]}\n{self.daemon_logs()}"
        )
        return out.stdout + out.stderr

    def start(self, command: str, where: str) -> str:
        n = len(self.background)
        out, err = self.logs / f"bg{n}.out", self.logs / f"bg{n}.err"
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen(
                self.argv("exec env " + command),  # env: VAR=value prefixes too
                cwd=self.cwd,
                env=self.env,
                stdout=o,
                stderr=e,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        bg = Background(command, proc, out, err)
        self.background.append(bg)
        port = re.search(r"--port\s+(\d+)", command)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(
                    f"{where}: {command!r} exited {proc.returncode}:\n"
                    f"{out.read_text()[-2000:]}\n{err.read_text()[-3000:]}"
                )
            if SERVES.match(command).group(1) == "run":  # type: ignore[union-attr]
                if "\nready" in "\n" + bg.text():
                    return bg.text()
            elif port and self._listening(int(port.group(1))):
                return ""
            time.sleep(0.1)
        raise AssertionError(f"{where}: {command!r} not up after 60 s:\n{err.read_text()[-3000:]}")

    def _listening(self, port: int) -> bool:
        probe = f"exec 3<>/dev/tcp/127.0.0.1/{port}"
        return subprocess.run(self.argv(probe), capture_output=True).returncode == 0

    def daemon_logs(self) -> str:
        return "\n".join(
            f"--- {bg.command} (stderr, last lines)\n{bg.err.read_text(errors='replace')[-2500:]}"
            for bg in self.background
        )

    def stop_all(self) -> list[str]:
        """Stops what was started in the background, last first; the ones that did not
        exit 0, with why."""
        bad = []
        for bg in reversed(self.background):
            if bg.proc.poll() is None:
                bg.proc.send_signal(signal.SIGTERM)
            try:
                code = bg.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(bg.proc.pid, signal.SIGKILL)
                code = bg.proc.wait()
            if code != 0:
                bad.append(f"{bg.command!r} exited {code}:\n{bg.err.read_text()[-2000:]}")
        return bad


@pytest.fixture
def reader(tmp_path: Path) -> Iterator[Reader]:
    why = namespace_unavailable()
    if why:
        pytest.skip(f"the docs' fixed ports need a network namespace: {why}")
    # A copy of the checkout (a few MB), so that what a block writes stays in it.
    cwd = tmp_path / "checkout"
    cwd.mkdir()
    skip = shutil.ignore_patterns(".*", "__pycache__", "*.so", "*.egg-info")
    for entry in ROOT.iterdir():
        if entry.name.startswith(".") or entry.name.endswith(".egg-info"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, cwd / entry.name, ignore=skip, symlinks=True)
        else:
            shutil.copy2(entry, cwd / entry.name)
    (cwd / ".venv").symlink_to(sys.prefix)  # the environment the set-up made: this one
    # The set-up's link (scripts/link_cli.sh), in a directory of the reader's PATH.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = Path(sys.executable).with_name("failover-supervisor")
    if exe.exists():
        (bin_dir / "failover-supervisor").symlink_to(exe)
    else:  # an environment without the console script: the same entry point
        shim = bin_dir / "failover-supervisor"
        shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m supervisor "$@"\n')
        shim.chmod(0o755)
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
    env["PYTHONPATH"] = str(ROOT)  # this checkout's code, also where .venv has another
    ns = f"fsup-docs-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
    try:
        subprocess.run(
            ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
            check=True,
            capture_output=True,
        )
        logs = tmp_path / "logs"
        logs.mkdir()
        r = Reader(ns, cwd, env, logs)
        try:
            yield r
        finally:
            r.stop_all()
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


RUNNABLE = [p for p in DOCS if any(b.skip is None for b in shell_blocks(p))]


@pytest.mark.e2e
@pytest.mark.parametrize("path", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_the_shell_blocks_work_as_printed(path: Path, reader: Reader) -> None:
    todo = [b for b in shell_blocks(path) if b.skip is None]
    for b in todo:  # before anything runs
        refuse_machine_changes(b)
    commands = [c for b in todo for c in b.commands()]
    runs_one = any(SERVES.match(c) and "run" in c.split() for c in commands)
    if not runs_one and any(TALKS.search(c) for c in commands):
        reader.start(EXAMPLE_DAEMON, f"{path.name}: the README's example daemon")
    for b in todo:
        printed = ""
        batch: list[str] = []
        for c in b.commands():
            if SERVES.match(c):
                if batch:
                    printed += reader.run(batch, b.where)
                    batch = []
                # As typed in a terminal of its own: a trailing comment is the reader's.
                printed += reader.start(c.split(" #")[0].strip(), b.where)
            else:
                batch.append(c)
        if batch:
            printed += reader.run(batch, b.where)
        if b.output is not None:
            missing = expect(b.output, printed)
            assert not missing, (
                f"{b.where}: the output the docs show is not what the block printed; "
                f"missing, in order:\n" + "\n".join(missing) + f"\n--- printed\n{printed[-4000:]}"
            )
    bad = reader.stop_all()
    assert not bad, "\n".join(bad)
