#!/usr/bin/env bash
# One command from a fresh clone to a working project:
#   1. system packages later steps need (SLURM + accounting; PostgreSQL and Chromium for tracking/UI tests),
#   2. .venv in the checkout with the project and every pinned dependency,
#   3. the main job on its embedded defaults (`orchestrate demo`).
# Re-running is fast: each step is skipped when what it installs is already there and unchanged.
# SKIP_DEMO=1 installs only (CI runs setup.sh with the demo, then the tests).
set -euo pipefail
cd "$(dirname "$0")"
VENV=.venv
PY=${PYTHON:-python3}

log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

install_system_packages() {
    local wanted=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server postgresql chromium chromium-driver)
    local missing=()
    for p in "${wanted[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && { log "system packages present"; return; }
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        log "WARNING: cannot install ${missing[*]} (needs root + apt-get); SLURM/PostgreSQL/browser tests will skip"
        return
    fi
    log "apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # policy-rc.d stops Debian from starting the daemons: our scripts start them with their own state folders.
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    rm -f /usr/sbin/policy-rc.d
}

pip_install() {
    # This machine's pip config lists local indexes that may be absent; drop pip's warning for each of them.
    "$VENV/bin/python" -m pip install -q "$@" 2> >(grep -v 'is ignored: it is neither a file' >&2)
}

require_free_disk() {
    # The venv is ~7.5 GB (torch's CUDA build alone is 5.5 GB). Running out half-way leaves a broken venv and a
    # pip traceback ("No space left on device"); say so up front instead.
    local need_gb=9 free_gb
    free_gb=$(( $(df -Pk . | awk 'NR==2 {print $4}') / 1024 / 1024 ))
    if [ "$free_gb" -lt "$need_gb" ]; then
        log "ERROR: $VENV needs about $need_gb GB free in $(pwd); the disk has $free_gb GB free"
        exit 1
    fi
}

install_python_env() {
    local stamp="$VENV/.installed" want
    want=$(cat pyproject.toml setup.sh | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then log ".venv up to date"; return; fi
    [ -x "$VENV/bin/python" ] || { require_free_disk; log "creating $VENV"; "$PY" -m venv "$VENV"; }
    pip_install --upgrade pip setuptools wheel
    # torch first and pinned: it must come from the local wheels, not a multi-GB CUDA download.
    pip_install torch==2.14.1 torchvision==0.29.1
    # DeepSpeed is an sdist; without build isolation it records the torch just installed.
    pip_install --no-build-isolation deepspeed==0.19.8
    pip_install -e ".[test]"
    echo "$want" >"$stamp"
}

install_system_packages
install_python_env
if [ "${SKIP_DEMO:-0}" != 1 ]; then
    log "running the main job: orchestrate demo"
    "$VENV/bin/orchestrate" demo
fi
