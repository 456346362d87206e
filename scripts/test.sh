#!/usr/bin/env bash
# The test command of README.md. Fast unit tests plus the slow full-size-model checks (about 5 GB RAM).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 LIFT3D_NO_PROGRESS=1
python3 -m pytest -q -p no:cacheprovider "$@"
