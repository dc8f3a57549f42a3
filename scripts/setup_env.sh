#!/usr/bin/env bash
# Create .venv/ at the repo root and install multispin-edge with every extra (idempotent:
# reinstalls only when pyproject.toml or constraints.txt changed). The first run builds
# llama-cpp-python from source (~7 minutes on 2 cores); pip caches the wheel after that.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "${PYTHON:-python3}" -m venv .venv
fi
stamp=.venv/.multispin-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing multispin-edge[dev] into .venv (first time: several minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]"
  echo "$want" > "$stamp"
fi
