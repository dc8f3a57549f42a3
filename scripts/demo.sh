#!/usr/bin/env bash
# The main job: set up .venv, then run the local demo (a controller and three device
# agents with different drafts on loopback). Extra arguments go to scripts/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
exec .venv/bin/python scripts/demo.py "$@"
