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

# The Python environment, rebuilt only when the pinned requirements change. No pip cache (it would keep a second
# copy of every wheel) and no triton (see requirements.txt): a fresh machine needs about 5 GB here, not 9.
req=tests/reference/requirements.txt
torch_req=tests/reference/torch.txt
stamp=.venv/.requirements.sha256
want=$(cat "$req" "$torch_req" | sha256sum | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python tools into .venv (torch, transformers, ...; a few minutes and about 5 GB the first time)"
  free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
  if [ "$free_kb" -lt $((6 * 1024 * 1024)) ]; then
    echo "setup: warning: only $((free_kb / 1024)) MiB free on $(df -P . | awk 'NR == 2 {print $6}'); .venv needs about 5 GB" >&2
  fi
  rm -rf .venv
  python3 -m venv .venv
  pip=(.venv/bin/pip install -q --disable-pip-version-check --no-cache-dir)
  "${pip[@]}" -r "$req"
  "${pip[@]}" --no-deps -r "$torch_req"
  echo "$want" > "$stamp"
fi
