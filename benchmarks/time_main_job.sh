#!/usr/bin/env bash
# The README main job, end to end, for two checkouts run alternately (issue 16's side-by-side timing):
#   git clone . /tmp/old && git -C /tmp/old checkout 14b5a4e
#   bash benchmarks/time_main_job.sh /tmp/old . 3        # 3 pairs; prints wall seconds, ratio and metrics
#   bash benchmarks/time_main_job.sh /tmp/old . 1 trainer.max_steps=20   # trailing key=value: overrides for both
# Run it on a quiet machine: each checkout's own lift3d is used (PYTHONPATH), outputs go to a temporary folder.
set -euo pipefail
old=$(cd "$1" && pwd); new=$(cd "$2" && pwd); pairs=${3:-3}; shift $(( $# < 3 ? $# : 3 ))
out=$(mktemp -d)
for i in $(seq "$pairs"); do
  for side in old new; do
    dir=${!side}
    start=$(date +%s.%N)
    (cd "$dir" && PYTHONPATH="$dir" LIFT3D_NO_PROGRESS=1 python launch.py --config configs/zero123-sjc-cpu.yaml \
        use_timestamp=false exp_root_dir="$out/$side$i" "$@" > "$out/$side$i.log" 2>&1)
    seconds=$(python -c "print(f'{$(date +%s.%N) - $start:.1f}')")
    metrics=$(python -c "import json; d = json.load(open('$out/$side$i/zero123-sjc-cpu/run/metrics.json')); \
print(f\"chamfer {d['chamfer_distance']:.4f} IoU {d['volume_iou']:.4f}\")")
    echo "pair $i $side ${seconds} s  $metrics"
    eval "t_$side=$seconds"
  done
  python -c "print(f'pair $i ratio old/new {$t_old / $t_new:.2f}')"
done
echo "outputs in $out"
