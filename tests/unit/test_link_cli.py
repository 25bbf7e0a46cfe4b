"""scripts/link_cli.sh, the set-up's last step, in a checkout of its own: after it,
``failover-supervisor`` is a command on PATH that runs the checkout's .venv."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def checkout(tmp_path: Path, name: str = "co") -> Path:
    co = tmp_path / name
    (co / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "link_cli.sh", co / "scripts")
    exe = co / ".venv" / "bin" / "failover-supervisor"
    exe.parent.mkdir(parents=True)
    exe.write_text(f"#!/bin/sh\necho 'the CLI of {name}' \"$@\"\n")
    exe.chmod(0o755)
    return co


def link(co: Path, bin_dir: Path, on_path: bool = True) -> subprocess.CompletedProcess[str]:
    path = os.environ["PATH"]
    env = {**os.environ, "FAILOVER_BIN_DIR": str(bin_dir)}
    env["PATH"] = f"{bin_dir}:{path}" if on_path else path
    return subprocess.run(
        ["bash", str(co / "scripts" / "link_cli.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def run_cli(bin_dir: Path) -> str:
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(
        ["failover-supervisor", "status"], capture_output=True, text=True, env=env, check=True
    ).stdout


def test_the_cli_is_linked_onto_path_and_a_rerun_is_quiet(tmp_path: Path) -> None:
    co, bin_dir = checkout(tmp_path), tmp_path / "bin"
    out = link(co, bin_dir)
    assert out.returncode == 0, out
    target = co / ".venv" / "bin" / "failover-supervisor"
    assert os.readlink(bin_dir / "failover-supervisor") == str(target)
    assert f"failover-supervisor is {bin_dir}/failover-supervisor -> {target}" in out.stderr
    assert run_cli(bin_dir) == "the CLI of co status\n"
    again = link(co, bin_dir)
    assert again.returncode == 0 and again.stderr == "", again


def test_a_link_to_another_checkout_is_replaced_and_said(tmp_path: Path) -> None:
    old, new, bin_dir = checkout(tmp_path, "old"), checkout(tmp_path, "new"), tmp_path / "bin"
    assert link(old, bin_dir).returncode == 0
    out = link(new, bin_dir)
    assert out.returncode == 0, out
    assert f"pointed to {old}/.venv/bin/failover-supervisor; now to {new}/" in out.stderr
    assert run_cli(bin_dir) == "the CLI of new status\n"


def test_a_file_that_is_not_a_link_is_left_alone(tmp_path: Path) -> None:
    co, bin_dir = checkout(tmp_path), tmp_path / "bin"
    bin_dir.mkdir()
    mine = bin_dir / "failover-supervisor"
    mine.write_text("#!/bin/sh\necho mine\n")
    out = link(co, bin_dir)
    assert out.returncode == 0, out
    assert f"{mine} is not a link made by this set-up: left as it is" in out.stderr
    assert mine.read_text() == "#!/bin/sh\necho mine\n" and not mine.is_symlink()


def test_a_directory_off_path_is_named(tmp_path: Path) -> None:
    co, bin_dir = checkout(tmp_path), tmp_path / "bin"
    out = link(co, bin_dir, on_path=False)
    assert out.returncode == 0, out
    assert f"{bin_dir} is not on your PATH: add it" in out.stderr


def test_a_checkout_without_its_venv_is_refused(tmp_path: Path) -> None:
    co = checkout(tmp_path)
    shutil.rmtree(co / ".venv")
    out = link(co, tmp_path / "bin")
    assert out.returncode == 1 and "run scripts/bootstrap.sh" in out.stderr, out
    assert not (tmp_path / "bin").exists()
