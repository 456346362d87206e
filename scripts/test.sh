#!/usr/bin/env bash
# The test command of README.md. Fast unit tests plus the slow full-size-model checks (about 5 GB RAM).
# With pytest-xdist (requirements-dev.txt) the tests run on every core, one torch thread per worker
# (2 workers x 1 thread beat 1 worker x 2 threads: 2 min 12 s against 3 min 50 s on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 LIFT3D_NO_PROGRESS=1
parallel=()
if python3 -c "import xdist" 2>/dev/null; then
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    parallel=(-n "${LIFT3D_TEST_WORKERS:-auto}" --dist worksteal)
fi
python3 -m pytest -q -p no:cacheprovider "${parallel[@]}" "$@"
