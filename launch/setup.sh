#!/usr/bin/env bash
# Installs exactly Tessera's dependencies (DESIGN.md §6): Debian packages, then the Python tools and test
# oracles into .venv. Idempotent and quiet when everything is already present.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  build-essential cmake pkg-config git
  libopenmpi-dev openmpi-bin libeigen3-dev libhdf5-dev libtomlplusplus-dev libgtest-dev libbenchmark-dev
  libsentencepiece-dev libcli11-dev nlohmann-json3-dev libopenblas-dev libopenblas0-openmp
  fortunes python3 python3-venv
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The Python environment, rebuilt only when the pinned requirements change.
req=tests/reference/requirements.txt
stamp=.venv/.requirements.sha256
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python tools into .venv (torch, transformers, ...; a few minutes the first time)"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r "$req"
  echo "$want" > "$stamp"
fi
