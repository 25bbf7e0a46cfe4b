"""A stand-in engine for the cuda-checkpoint test: holds GPU memory with a known pattern.

    python torch_engine.py GIB [--child GIB]

Prints ``ready <pid>`` once the memory is filled; answers ``check`` on stdin with
``ok <pid>`` or ``bad <pid>`` after verifying the pattern on the GPU. With ``--child`` it
starts a second such process first (a two-process tree); ``check`` checks both.
"""

import subprocess
import sys

import torch


def main() -> None:
    gib = float(sys.argv[1])
    child = None
    if "--child" in sys.argv:
        child_gib = sys.argv[sys.argv.index("--child") + 1]
        child = subprocess.Popen(
            [sys.executable, __file__, child_gib],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        child.stdout.readline()  # its "ready"
    n = int(gib * 2**30) // 4
    data = torch.arange(n, dtype=torch.int32, device="cuda").remainder_(251)  # in place
    expected = int(data.sum(dtype=torch.int64).item())
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # hold what the data needs, not the allocator's spare blocks
    print(f"ready {__import__('os').getpid()}", flush=True)
    for line in sys.stdin:
        if line.strip() == "check":
            ok = (
                int(data.sum(dtype=torch.int64).item()) == expected
                and int(data[12345].item()) == 12345 % 251
            )
            verdict = "ok" if ok else "bad"
            if child is not None:
                assert child.stdin is not None and child.stdout is not None
                child.stdin.write("check\n")
                child.stdin.flush()
                verdict = verdict if child.stdout.readline().startswith("ok") else "bad"
            print(f"{verdict} {__import__('os').getpid()}", flush=True)


if __name__ == "__main__":
    main()
