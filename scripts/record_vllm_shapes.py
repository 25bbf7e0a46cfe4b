"""Record the shapes of a real vLLM server's answers, for the simulator's fidelity test.

    .venv-vllm/bin/vllm serve .state/tiny-llama --served-model-name tiny --port 18555 \\
        --dtype float32 --max-model-len 400 --enforce-eager &
    .venv/bin/python scripts/record_vllm_shapes.py http://127.0.0.1:18555 tiny \\
        tests/data/vllm-shapes.json

vLLM serves ``/v1/embeddings`` only from a pooling model: record the ``embeddings`` entry
from a second server (``--runner pooling``, or ``--convert embed`` on the same model) with
``--only embeddings`` and the same destination, which keeps the other entries.

A shape keeps a response's structure and value types, never its values: the simulator's
answers to the same requests must have the same shapes (tests/integration/
test_sim_shapes.py). Run it again when moving to a new vLLM version.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from typing import Any

from supervisor.testing.shapes import REQUESTS, answer_shape, request_for


def call(base: str, method: str, path: str, body: Any) -> tuple[int, bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        base + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def record(base: str, model: str, only: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in only or REQUESTS:
        method, path, body = request_for(name, model)
        status, raw = call(base, method, path, body)
        out[name] = answer_shape(body, status, raw)
        print(f"{name}: {status}", file=sys.stderr)
    return out


def main() -> int:
    args = sys.argv[1:]
    only = None
    if len(args) == 5 and args[3] == "--only":
        only = args[4].split(",")
        args = args[:3]
    if len(args) != 3 or any(name not in REQUESTS for name in only or ()):
        print(__doc__, file=sys.stderr)
        return 2
    base, model, dest = args[0].rstrip("/"), args[1], args[2]
    shapes = record(base, model, only)
    if only:  # the other entries stay as recorded
        with open(dest) as f:
            shapes = {**json.load(f), **shapes}
    with open(dest, "w") as f:
        json.dump(shapes, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(shapes)} shapes to {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
