"""Compile the relay's hot modules (supervisor.native.MODULES) with mypyc, in place.

    python scripts/build_native.py            # build if missing or stale (else nothing)
    python scripts/build_native.py --force    # build again
    python scripts/build_native.py --clean    # remove the build: pure Python from then on

The same typed sources run either way; compiled, the relay spends about half the CPU per
request and per token (docs/frontend.md, "The relay's cost"). The build needs a C
compiler and Python's headers (Debian: gcc, python3-dev). Where they are missing it says
so and leaves the relay pure Python (exit 0); a compile error is a bug and exits 1.
Outputs, all ignored by git: supervisor/_native__mypyc.<abi>.so, one small extension per
compiled module beside its source, and supervisor/_native.json (the digests of the sources
read, which supervisor.native checks at every start).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from supervisor import native  # noqa: E402  (after the path is set)


def say(msg: str) -> None:
    print(f"[native] {msg}", file=sys.stderr, flush=True)


def project_imports(module: str) -> set[str]:
    """The project's modules that ``module`` imports (their digests go in the record too:
    a compiled module may rely on what it imports, e.g. a constant folded in)."""
    tree = ast.parse(native.source_of(module).read_text())
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name.split(".")[0] in ("supervisor", "plugins") and native.source_of(name).exists():
                found.add(name)
    return found


def sources_read() -> list[Path]:
    mods = {*native.MODULES, native.__name__}  # (which modules are compiled is read too)
    for m in native.MODULES:
        mods |= project_imports(m)
    return sorted(native.source_of(m) for m in mods)


def missing_tools() -> str | None:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc})"
    include = Path(sysconfig.get_paths()["include"], "Python.h")
    if not include.exists():
        return f"no Python headers ({include})"
    try:
        import mypyc  # noqa: F401
    except ImportError:
        return "mypyc is not installed (it comes with mypy: pip install mypy)"
    return None


def clean() -> None:
    for m in (*native.MODULES, *native.RETIRED):
        for p in native.compiled_files(m):
            p.unlink()
    lib = ROOT.joinpath(*native.GROUP.split("."))
    for p in lib.parent.glob(lib.name + "__mypyc.*"):
        p.unlink()
    native.MANIFEST.unlink(missing_ok=True)


def build() -> None:
    from mypyc.build import mypycify
    from setuptools import Distribution

    sources = [str(native.source_of(m).relative_to(ROOT)) for m in native.MODULES]
    with tempfile.TemporaryDirectory(prefix="failover-native-") as tmp:
        log = io.StringIO()
        t0 = time.monotonic()
        cwd = os.getcwd()
        os.chdir(ROOT)  # mypy reads its settings from pyproject.toml here
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                extensions = mypycify(
                    sources,
                    opt_level="3",
                    group_name=native.GROUP,
                    target_dir=str(Path(tmp, "c")),
                    multi_file=True,  # several C files: the compiler runs on each core
                )
                # A group named inside a package has its headers written in that package's
                # folder, which mypyc does not add to the include path itself.
                headers = Path(tmp, "c", *native.GROUP.split(".")[:-1])
                for ext in extensions:
                    ext.include_dirs.append(str(headers))
                # A bare Distribution: setup() would read pyproject.toml's packaging
                # metadata, which is not what is built here.
                dist = Distribution({"name": "failover-native", "ext_modules": extensions})
                cmd = dist.get_command_obj("build_ext")
                cmd.build_lib = str(Path(tmp, "lib"))
                cmd.build_temp = str(Path(tmp, "obj"))
                cmd.parallel = os.cpu_count() or 1
                dist.run_command("build_ext")
        except (Exception, SystemExit) as e:
            sys.stderr.write(log.getvalue()[-6000:])
            say(f"compiling failed: {e!r}")
            say("the relay stays pure Python; FAILOVER_NATIVE=0 skips this step")
            raise SystemExit(1) from None
        finally:
            os.chdir(cwd)
        clean()
        built = sorted(Path(tmp, "lib").rglob("*.so"))
        for so in built:
            dest = ROOT / so.relative_to(Path(tmp, "lib"))
            shutil.copy2(so, dest)
        record = {
            "mypyc_group": native.GROUP,
            "python": native.interpreter(),
            "sources": {str(p.relative_to(ROOT)): native.digest(p) for p in sources_read()},
        }
        tmp_manifest = native.MANIFEST.with_suffix(".tmp")
        tmp_manifest.write_text(json.dumps(record, indent=1) + "\n")
        tmp_manifest.replace(native.MANIFEST)  # last: a half-done build is never "fresh"
        say(f"compiled {len(native.MODULES)} modules in {time.monotonic() - t0:.0f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="build even if fresh")
    ap.add_argument("--clean", action="store_true", help="remove the build")
    args = ap.parse_args()
    if args.clean or os.environ.get("FAILOVER_NATIVE") == "0":
        clean()
        say("no compiled modules: the relay runs as pure Python")
        return 0
    present = any(native.compiled_files(m) for m in native.MODULES)
    if present and not args.force and not native.stale_sources():
        say("compiled relay modules are up to date")
        return 0
    why = missing_tools()
    if why is not None:
        clean()  # (a stale build would be set aside at start anyway; say it plainly)
        say(f"{why}: the relay runs as pure Python (slower); see docs/frontend.md")
        return 0
    say(f"compiling {len(native.MODULES)} relay modules with mypyc (about a minute)...")
    build()
    return 0


if __name__ == "__main__":
    sys.exit(main())
