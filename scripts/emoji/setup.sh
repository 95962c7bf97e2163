#!/usr/bin/env bash
# Creates the virtual environment for build_dataset.py and installs its pinned
# requirements; a second run with nothing changed installs nothing.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${XDG_CACHE_HOME:-$HOME/.cache}/altc/emoji-venv"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"

# Pillow's wheel loads FriBiDi from the system for its libraqm layout, without which
# emoji ZWJ sequences do not become ligatures.
if ! dpkg -s libfribidi0 >/dev/null 2>&1; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    echo "emoji setup: installing libfribidi0"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libfribidi0 >/dev/null
fi

# A venv whose creation failed half-way (no ensurepip) is made again.
if ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    python3 -m venv --clear "$venv" || {
        echo "emoji setup: python3 -m venv failed (Debian: install python3-venv)" >&2
        exit 1
    }
    rm -f "$stamp"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "emoji setup: installing requirements into $venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$here/requirements.txt"
    echo "$want" >"$stamp"
fi
echo "emoji setup: ok; run $venv/bin/python $here/build_dataset.py --out DIR"
