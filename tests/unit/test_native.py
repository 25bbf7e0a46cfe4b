"""The compiled relay (supervisor.native, scripts/build_native.py): it runs when its build is
fresh, and a stale or refused build is set aside for the sources, all modules at once."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import native

BUILT = native.MANIFEST.exists()
needs_build = pytest.mark.skipif(
    not BUILT,
    reason="no compiled relay here (scripts/build_native.py: FAILOVER_NATIVE=0, or no C "
    "compiler); the relay runs as pure Python",
)

PROBE = """
import importlib, json, supervisor
mods = {m: importlib.import_module(m).__file__ for m in supervisor.native.MODULES}
native = supervisor.native
print(json.dumps({"status": native.STATUS, "stale": native.STALE, "files": mods}))
"""


def imported(tree: Path, **env: str) -> dict[str, object]:
    """What a fresh interpreter imports from the copy of the source tree at ``tree``."""
    run_env = {k: v for k, v in os.environ.items() if k != native.PURE_ENV}
    run_env.update(env, PYTHONPATH=str(tree))
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tree, env=run_env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of supervisor/ and plugins/, with the build's files."""
    for pkg in ("supervisor", "plugins"):
        shutil.copytree(
            native.ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__")
        )
    return tmp_path


def kinds(files: object) -> set[str]:
    assert isinstance(files, dict)
    return {"source" if str(f).endswith(".py") else "compiled" for f in files.values()}


@needs_build
def test_this_checkout_runs_its_fresh_build() -> None:
    # The test command builds before the tests run: a stale build here means a source
    # changed after it, and the daemons under test would be running the sources.
    assert native.STATUS.startswith("compiled"), native.STATUS
    assert native.stale_sources() == []


@needs_build
def test_a_fresh_build_is_imported_compiled(tree: Path) -> None:
    got = imported(tree)
    assert str(got["status"]).startswith("compiled")
    assert kinds(got["files"]) == {"compiled"}


@needs_build
def test_a_source_changed_after_the_build_sets_the_whole_build_aside(tree: Path) -> None:
    stops = tree / "supervisor" / "frontend" / "stops.py"
    stops.write_text(stops.read_text() + "\n# changed after the build\n")
    got = imported(tree)
    assert got["stale"] is True
    assert "stale" in str(got["status"]) and "supervisor/frontend/stops.py" in str(got["status"])
    # All of them, not only the changed one: compiled modules call each other natively.
    assert kinds(got["files"]) == {"source"}


@needs_build
def test_a_module_the_build_read_counts_too(tree: Path) -> None:
    # config.py is not compiled, but compiled modules were built against it.
    config = tree / "supervisor" / "config.py"
    config.write_text(config.read_text() + "\n# changed\n")
    assert kinds(imported(tree)["files"]) == {"source"}


@needs_build
def test_the_environment_can_refuse_the_build(tree: Path) -> None:
    got = imported(tree, **{native.PURE_ENV: "1"})
    assert native.PURE_ENV in str(got["status"]) and got["stale"] is False
    assert kinds(got["files"]) == {"source"}


@needs_build
def test_a_build_for_another_python_is_a_stale_build(tree: Path) -> None:
    # A .venv made again from another interpreter finds .so files of the same name.
    manifest = tree / "supervisor" / native.MANIFEST.name
    record = json.loads(manifest.read_text())
    assert record["python"] == native.interpreter()
    record["python"] = "3.11.0 at /opt/another/bin/python3.11"
    manifest.write_text(json.dumps(record))
    got = imported(tree)
    assert got["stale"] is True and "built for another Python" in str(got["status"])
    assert kinds(got["files"]) == {"source"}


@needs_build
@pytest.mark.parametrize("record", ["", "{not json", '{"sources": 3}', None])
def test_a_missing_or_broken_build_record_is_a_stale_build(tree: Path, record: str | None) -> None:
    manifest = tree / "supervisor" / native.MANIFEST.name
    if record is None:
        manifest.unlink()
    else:
        manifest.write_text(record)
    got = imported(tree)
    assert str(got["status"]).startswith("pure Python")
    assert kinds(got["files"]) == {"source"}


def test_no_build_at_all_is_pure_python(tree: Path) -> None:
    for m in native.MODULES:
        for f in native.compiled_files(m):
            (tree / f.relative_to(native.ROOT)).unlink()
    for f in (tree / "supervisor").glob("_native*"):
        f.unlink()
    got = imported(tree)
    assert str(got["status"]).startswith("pure Python (not compiled")
    assert kinds(got["files"]) == {"source"}


def test_the_build_record_names_every_compiled_module() -> None:
    if not BUILT:
        pytest.skip("no compiled relay here")
    recorded = json.loads(native.MANIFEST.read_text())["sources"]
    for m in native.MODULES:
        assert str(native.source_of(m).relative_to(native.ROOT)) in recorded


def test_no_compiled_function_reuses_an_except_name_for_another_type() -> None:
    # mypyc gives a name one type per function: `except A as e` then `except B as e` makes
    # the second clause raise TypeError when compiled (a B is not an A), and the exception
    # being handled is lost. Each clause names its exception differently.
    found = []
    for module in native.MODULES:
        path = native.source_of(module)
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            kinds: dict[str, set[str]] = {}
            for node in ast.walk(fn):
                if isinstance(node, ast.ExceptHandler) and node.name and node.type is not None:
                    kinds.setdefault(node.name, set()).add(ast.unparse(node.type))
            found += [
                f"{module}.{fn.name}: {n} {sorted(t)}" for n, t in kinds.items() if len(t) > 1
            ]
    assert found == []


@needs_build
def test_the_relay_tests_pass_in_pure_python_too() -> None:
    # The suite runs the build; a node without a compiler runs the sources. The relay's own
    # tests run once more here with the build set aside, so both stay true.
    relay_tests = [
        "tests/integration/test_frontend_server.py",
        "tests/integration/test_whole_answers.py",
        "tests/integration/test_relay_no_leaks.py",
        "tests/integration/test_stall_judgement.py",
    ]
    env = dict(os.environ, **{native.PURE_ENV: "1"})
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *relay_tests],
        cwd=native.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    # ... and that environment does import the sources, not the build:
    probe = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=native.ROOT, env=env, capture_output=True, text=True
    )
    assert kinds(json.loads(probe.stdout)["files"]) == {"source"}
