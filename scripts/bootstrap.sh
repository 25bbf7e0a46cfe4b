#!/usr/bin/env bash
# Sets up everything the demo and the tests need on a fresh Debian machine, then returns:
#   - etcd-server, nats-server and prometheus from Debian's packages, when missing;
#   - a virtual environment in .venv with this package, its dev tools (pinned by
#     constraints.txt) and the example third-party backend of tests/example_plugin;
#   - the relay's hot modules compiled with mypyc (scripts/build_native.py; a C compiler and
#     Python's headers come from Debian's packages when missing). FAILOVER_NATIVE=0 skips
#     this and leaves the relay pure Python;
#   - the failover-supervisor command on PATH: a link to .venv/bin/failover-supervisor in
#     /usr/local/bin (as root) or ~/.local/bin, as pipx does (scripts/link_cli.sh).
# Re-running is cheap: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else say "need root to run: $*  (install sudo or run as root)"; return 1; fi
}

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }

# The interpreter: $PYTHON if set; else the distribution's own /usr/bin/python3 when it is
# 3.11 or later (on Debian a static build, on which the relay spends about a tenth less CPU
# per request than on a shared-library build such as pyenv's default; it is also the one a
# root install gets, as sudo does not keep a user's PATH); else python3 from PATH.
if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    PY=/usr/bin/python3
else
    PY=python3
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    say "Python >= 3.11 is required (found: $("$PY" --version 2>&1 || echo none))"
    exit 1
fi

apt_pkgs=()
have etcd || apt_pkgs+=(etcd-server)
have nats-server || apt_pkgs+=(nats-server)
have prometheus || apt_pkgs+=(prometheus)  # with promtool: alert rules and a real scrape
"$PY" -m venv --help >/dev/null 2>&1 && "$PY" -c 'import ensurepip' 2>/dev/null \
    || apt_pkgs+=(python3-venv)
if [ "${FAILOVER_NATIVE:-1}" != 0 ]; then
    have gcc || apt_pkgs+=(gcc)
    "$PY" -c 'import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
        || apt_pkgs+=("python$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-dev")
fi
if [ ${#apt_pkgs[@]} -gt 0 ]; then
    if command -v apt-get >/dev/null 2>&1; then
        say "installing from Debian's packages: ${apt_pkgs[*]}"
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
            "${apt_pkgs[@]}" >/dev/null
    else
        say "missing ${apt_pkgs[*]} and no apt-get here: install them by hand"
        exit 1
    fi
fi

# A .venv made from another interpreter (an older checkout, another $PYTHON) is made again.
base=$("$PY" -c 'import os, sys; print(os.path.realpath(sys.executable))')
if [ -f .venv/pyvenv.cfg ] && ! grep -qxF "executable = $base" .venv/pyvenv.cfg; then
    say "re-creating .venv for $base (it was made for another Python)"
    rm -rf .venv
fi
stamp=.venv/.installed
want=$(cat pyproject.toml constraints.txt tests/example_plugin/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    say "creating .venv and installing failover-supervisor with its dev tools"
    [ -x .venv/bin/python ] || "$PY" -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    # The example third-party backend is installed like any plugin, for its conformance test.
    .venv/bin/python -m pip install -q -c constraints.txt -e '.[dev]' -e tests/example_plugin
    echo "$want" > "$stamp"
fi

# The relay compiled (about a minute, only when a source it reads has changed).
.venv/bin/python scripts/build_native.py

# The CLI on PATH, so that `failover-supervisor ...` works as the docs print it.
bash scripts/link_cli.sh
