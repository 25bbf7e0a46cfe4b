#!/usr/bin/env bash
# Puts the CLI on PATH as pipx puts its apps: a link named failover-supervisor to this
# checkout's .venv/bin/failover-supervisor, in /usr/local/bin when run as root, else in
# ~/.local/bin; FAILOVER_BIN_DIR names another directory. Run by scripts/bootstrap.sh.
# A link there to another checkout is replaced (the latest set-up wins, and says so); a file
# that is not a link is left alone, with a line saying so.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*" >&2; }

target=$PWD/.venv/bin/failover-supervisor
if [ ! -x "$target" ]; then
    say "no $target to link: run scripts/bootstrap.sh"
    exit 1
fi
if [ -n "${FAILOVER_BIN_DIR:-}" ]; then
    bin_dir=$FAILOVER_BIN_DIR
elif [ "$(id -u)" -eq 0 ]; then
    bin_dir=/usr/local/bin
else
    bin_dir=$HOME/.local/bin
fi
link=$bin_dir/failover-supervisor
now=$(readlink "$link" 2>/dev/null || true)
if [ "$now" != "$target" ]; then
    if [ -e "$link" ] && [ ! -L "$link" ]; then
        say "$link is not a link made by this set-up: left as it is; this checkout's CLI is $target"
        exit 0
    fi
    mkdir -p "$bin_dir"
    [ -n "$now" ] && say "$link pointed to $now; now to $target"
    ln -sfn "$target" "$link"
    say "failover-supervisor is $link -> $target"
fi
case ":$PATH:" in
*":$bin_dir:"*) ;;
*) say "$bin_dir is not on your PATH: add it (export PATH=\"$bin_dir:\$PATH\") to type failover-supervisor" ;;
esac
