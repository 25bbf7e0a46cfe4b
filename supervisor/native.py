"""The relay's hot modules, compiled to C by mypyc where a fresh build is present.

Every request and every streamed token passes through a few modules (``MODULES``); in
pure Python their interpreter overhead is most of the daemon's CPU per request.
``scripts/build_native.py`` compiles those same typed sources with mypyc (nothing is
written twice: the source stays the one truth, and pure Python runs it unchanged) and
records in ``_native.json`` the SHA-256 of every source the build read.

On import of the package, :func:`check` compares those digests with the sources on disk.
Where any differs (a source edited since the build), or ``FAILOVER_PURE_PYTHON`` is set,
the compiled modules are set aside, all of them, and their sources are imported instead:
a stale compiled module never runs, and a partly compiled relay never mixes two versions.
:data:`STATUS` says which it is; the daemon logs it at start, with a warning when
:data:`STALE` (a checkout updated without running the build again).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

# The modules compiled, in one mypyc group (calls between them are native calls).
MODULES = (
    "supervisor.frontend.h1",
    "supervisor.frontend.wire",
    "supervisor.frontend.engine_pool",
    "supervisor.frontend.server",
    "supervisor.frontend.heads",
    "supervisor.frontend.streams",
    "supervisor.frontend.pump",
    "supervisor.frontend.shape",
    "supervisor.frontend.extras",
    "supervisor.frontend.app",
    "supervisor.frontend.validate",
    "supervisor.frontend.choices",
    "supervisor.frontend.routing",
    "supervisor.frontend.stops",
    "supervisor.frontend.outcome",
    "supervisor.openai_shapes",
    "supervisor.requests",
    "supervisor.jsonbody",
    "supervisor.events",
    "plugins.vllm",
)
# Modules that earlier builds compiled and this one does not: an extension file of one, left
# in a checkout by such a build, would be imported ahead of its source, so it never is (and
# the build removes it).
RETIRED = ("supervisor.model",)
# The group's shared library: supervisor/_native__mypyc.<abi>.so (mypyc adds the suffix).
GROUP = "supervisor._native"
ROOT = Path(__file__).resolve().parent.parent  # the source tree: supervisor/ and plugins/
MANIFEST = Path(__file__).with_name("_native.json")
PURE_ENV = "FAILOVER_PURE_PYTHON"


def source_of(module: str) -> Path:
    return ROOT.joinpath(*module.split(".")).with_suffix(".py")


def compiled_files(module: str) -> list[Path]:
    """The extension files that would be imported for ``module`` instead of its source."""
    base = ROOT.joinpath(*module.split("."))
    return [
        p
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
        if (p := base.with_name(base.name + suffix)).exists()
    ]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def interpreter() -> str:
    """The running Python, as the build record names the one it compiled for."""
    return f"{sys.version.split()[0]} at {os.path.realpath(sys.executable)}"


def stale_sources(manifest: Path = MANIFEST) -> list[str]:
    """Why the build cannot be used: the sources (relative paths) changed since it, or what
    else is wrong with it; empty when it is fresh."""
    try:
        record = json.loads(manifest.read_text())
        recorded = record["sources"]
    except FileNotFoundError:
        return ["no build record (_native.json)"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"unreadable build record: {e!r}"]
    if not isinstance(recorded, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in recorded.items()
    ):
        return ["unreadable build record: no digests of sources"]
    if record.get("python") != interpreter():
        # Compiled against another interpreter's headers (e.g. .venv made again from
        # another Python): the same file name, but not the same build.
        return [f"built for another Python ({record.get('python')})"]
    changed = []
    for rel, sha in sorted(recorded.items()):
        try:
            if digest(ROOT / rel) != sha:
                changed.append(f"{rel} changed")
        except OSError:
            changed.append(f"{rel} cannot be read")
    return changed


class _SourcesFirst(importlib.abc.MetaPathFinder):
    """Imports the named modules from their ``.py`` sources, ahead of any extension."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.names:
            return None
        return importlib.util.spec_from_file_location(fullname, source_of(fullname))


def check() -> tuple[str, bool]:
    """Decide, once per process, whether the compiled modules run; say which and why, and
    whether a build was set aside for being stale."""
    retired = [m for m in RETIRED if compiled_files(m)]
    if retired:
        sys.meta_path.insert(0, _SourcesFirst(retired))
    if not any(compiled_files(m) for m in MODULES):
        return "pure Python (not compiled: scripts/build_native.py builds it)", False
    reason = None
    stale = False
    if os.environ.get(PURE_ENV):
        reason = f"{PURE_ENV} is set"
    else:
        changed = stale_sources()
        if changed:
            stale = True
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            reason = f"the build is stale: {', '.join(changed[:3])}{more}"
    if reason is None:
        return f"compiled with mypyc ({len(MODULES)} modules)", False
    if not any(isinstance(f, _SourcesFirst) and f.names >= set(MODULES) for f in sys.meta_path):
        sys.meta_path.insert(0, _SourcesFirst(MODULES))
    return f"pure Python ({reason})", stale


STATUS, STALE = check()
