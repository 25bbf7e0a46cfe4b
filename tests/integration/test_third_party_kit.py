"""A third-party package as its author would ship it (tests/tinyserve_plugin: an engine of
its own, tinyserve, and its backend), installed with pip into a fresh virtual environment
next to failover-supervisor[kit], runs its own tests: the conformance kit against the real
tinyserve program, testing exactly what the backend declares it can do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "tests" / "tinyserve_plugin"


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)  # type: ignore[call-overload, no-any-return]


def test_a_third_party_package_passes_the_kit_against_its_real_engine(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", str(venv)]).returncode == 0
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    constraints = ["-c", str(ROOT / "constraints.txt")]
    installed = run([*pip, *constraints, f"{ROOT}[kit]", str(PACKAGE)])
    assert installed.returncode == 0, installed.stderr[-3000:]
    # The author's own test run, with the venv's programs (tinyserve) on the PATH.
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    out = run(
        [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs"],
        cwd=PACKAGE,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    summary = out.stdout.strip().splitlines()[-1]
    print(f"\ntinyserve's own kit run: {summary}")
    # Chat and token-id prompts are skipped because the backend says it has neither.
    assert "passed" in summary and "failed" not in summary, summary
    assert "declares serves_chat = False" in out.stdout
