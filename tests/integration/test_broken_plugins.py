"""A broken third-party backend (a typo in its entry point, an import error, a class that is
not a Backend) is reported by name with the reason; it breaks neither ``backends`` (which
still lists every other backend) nor ``check-config`` (a config problem, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BROKEN = {
    "typo": "broken_plugins:NoSuchClass",
    "crashes": "broken_plugins_crash:Backend",
    "notabackend": "broken_plugins:NotABackend",
}


def site_with_broken_plugins(tmp_path: Path) -> Path:
    """A real installed distribution (dist-info + entry points) without pip."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "broken_plugins.py").write_text("class NotABackend:\n    pass\n")
    (site / "broken_plugins_crash.py").write_text("raise ImportError('missing libfoo')\n")
    info = site / "broken_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugins\nVersion: 0.1\n")
    lines = [f"{name} = {target}" for name, target in BROKEN.items()]
    (info / "entry_points.txt").write_text(
        "[failover_supervisor.backends]\n" + "\n".join(lines) + "\n"
    )
    return site


def run_cli(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args], capture_output=True, text=True, env=env
    )


def test_backends_lists_broken_plugins_with_their_reason(tmp_path: Path) -> None:
    out = run_cli(site_with_broken_plugins(tmp_path), "backends")
    assert out.returncode == 1, out
    lines = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert "plugins.vllm.VllmBackend" in lines["vllm"]  # the others are still listed
    assert "BROKEN" in lines["typo"] and "NoSuchClass" in lines["typo"]
    assert "BROKEN" in lines["crashes"] and "missing libfoo" in lines["crashes"]
    assert "BROKEN" in lines["notabackend"] and "not a subclass" in lines["notabackend"]
    assert "Traceback" not in out.stdout + out.stderr


def test_check_config_names_the_plugin_that_failed_to_load(tmp_path: Path) -> None:
    site = site_with_broken_plugins(tmp_path)
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[[slot]]\nname = "a"\nmodel = "m"\nbackend = "crashes"\nbase_port = 18200\n'
        "simulate = true\nshadows = 0\n"
    )
    out = run_cli(site, "check-config", str(cfg))
    assert out.returncode == 2, out
    assert "backend 'crashes'" in out.stderr and "missing libfoo" in out.stderr
    assert "Traceback" not in out.stderr
