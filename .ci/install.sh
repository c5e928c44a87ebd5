#!/usr/bin/env bash
# Installs hpcdl's whole stack on a fresh Debian 12 machine, idempotently:
#   1. Debian packages (as root; otherwise prints the apt command and stops),
#   2. a venv with the pinned Python packages (requirements.lock),
#   3. Horovod built from source against that TensorFlow and Debian's Open MPI,
#   4. hpcdl itself, editable.
# The venv lives in a cache directory keyed on a hash of the pins, and ./.venv links to it,
# so a fresh clone with the same pins (CI) reuses it instead of rebuilding Horovod.
set -euo pipefail
cd "$(dirname "$0")/.."

# postgresql, mariadb-server: real database servers are study storages in the tests;
# chromium: the tests render the report in headless Chromium.
DEBIAN_PACKAGES=(openmpi-bin libopenmpi-dev libpmix-dev dataset-fashion-mnist hdf5-tools
                 postgresql mariadb-server chromium "$@")
HOROVOD_PIN="horovod==0.28.1"
PYTHON="${PYTHON:-python3}"
CACHE_DIR="${HPCDL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hpcdl}"

log() { printf '[install] %s\n' "$*" >&2; }

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  apt_cmd="apt-get install -y --no-install-recommends ${missing[*]}"
  if [[ $(id -u) -ne 0 ]]; then
    log "missing Debian packages: ${missing[*]}"
    log "run as root:  apt-get update && DEBIAN_FRONTEND=noninteractive $apt_cmd"
    exit 1
  fi
  log "apt: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $apt_cmd >/dev/null
fi

# The venv is keyed on what Horovod is compiled against; the rest of the lock is synced into it
# with a stamp of its own, so adding a pure-Python package does not rebuild Horovod.
build_pins=$(grep -iE '^(tensorflow|tf[-_]keras|mpi4py|numpy)==' requirements.lock | sort)
build_hash=$( { echo "$build_pins"; echo "$HOROVOD_PIN"; "$PYTHON" --version; } | sha256sum | cut -c1-16)
lock_hash=$(sha256sum requirements.lock | cut -c1-16)
venv="$CACHE_DIR/venv-$build_hash"

if [[ ! -f "$venv/.hpcdl-horovod" ]]; then
  log "building venv $venv (TensorFlow, then Horovod from source: ~5 min)"
  rm -rf "$venv"
  mkdir -p "$CACHE_DIR"
  "$PYTHON" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip wheel setuptools
  "$venv/bin/pip" install -q -r requirements.lock
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
  HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 HOROVOD_CPU_OPERATIONS=MPI \
    "$venv/bin/pip" install -q --no-cache-dir --no-build-isolation "$HOROVOD_PIN"
  touch "$venv/.hpcdl-horovod"
fi
if [[ ! -f "$venv/.hpcdl-lock-$lock_hash" ]]; then
  log "syncing $venv with requirements.lock"
  "$venv/bin/pip" install -q -r requirements.lock
  rm -f "$venv"/.hpcdl-lock-*
  touch "$venv/.hpcdl-lock-$lock_hash"
else
  log "venv up to date ($venv)"
fi

ln -sfn "$venv" .venv
# hpcdl itself changes with every commit, so it is (re)linked into the venv each time; cheap.
.venv/bin/pip install -q --no-deps --no-build-isolation -e .
log "ready: $(readlink .venv)"
