#!/usr/bin/env bash
# Create .venv (Python 3.11+) with the project's requirements; idempotent and quiet.
# Usage: scripts/setup_venv.sh [requirements file, default requirements.txt]
set -euo pipefail
cd "$(dirname "$0")/.."
req="${1:-requirements.txt}"
stamp=".venv/.installed-$(basename "$req")"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if [ ! -f "$stamp" ] || [ "$req" -nt "$stamp" ] || [ requirements.txt -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -r "$req"
  touch "$stamp"
fi
