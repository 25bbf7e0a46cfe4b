"""What a restarted supervisor needs to re-adopt running engines: ``state_dir/engines.json``.

Written (atomically) on every engine state change. An engine is identified by pid *and*
process start time, so a pid reused by another process after a reboot or a crash is never
mistaken for ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

STATE_VERSION = 1


def save(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically (a temporary file of its own, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"version": STATE_VERSION, **data}, indent=1))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load(path: Path) -> dict[str, Any] | None:
    """The saved state, or None if there is none or it cannot be used (said in the log)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        return None
    return data
