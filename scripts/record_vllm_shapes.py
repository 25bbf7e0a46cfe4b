"""Record the shapes of a real vLLM server's answers, for the simulator's fidelity test.

    .venv-vllm/bin/vllm serve .state/tiny-llama --served-model-name tiny --port 18555 \\
        --dtype float32 --max-model-len 400 --enforce-eager &
    .venv/bin/python scripts/record_vllm_shapes.py http://127.0.0.1:18555 tiny \\
        tests/data/vllm-shapes.json

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


def record(base: str, model: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in REQUESTS:
        method, path, body = request_for(name, model)
        status, raw = call(base, method, path, body)
        out[name] = answer_shape(body, status, raw)
        print(f"{name}: {status}", file=sys.stderr)
    return out


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    base, model, dest = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3]
    shapes = record(base, model)
    with open(dest, "w") as f:
        json.dump(shapes, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(shapes)} shapes to {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
