#!/usr/bin/env bash
# The demo at another commit (issue 37): `codetr demo` of COMMIT at train.seed=SEED, one thread on
# CPU core CORE, then its box AP on 500 held-out synthetic images (generator seed 1, as
# bench/convergence.py). Appends one line to bench/results/demo_runs.txt.
#   bash bench/demo_runs.sh COMMIT SEED CORE      e.g. bash bench/demo_runs.sh 728cb0c 1 0
# Needs .venv (make setup); the commit is checked out in a worktree under $WORK (default /tmp/demo_runs).
set -euo pipefail
commit=$1 seed=$2 core=$3
root=$(cd "$(dirname "$0")/.." && pwd)
work=${WORK:-/tmp/demo_runs}
py=$root/.venv/bin/python
tree=$work/tree_$commit out=$work/run_${commit}_seed$seed heldout=$work/heldout500
[ -d "$tree" ] || git -C "$root" worktree add --detach "$tree" "$commit"
[ -f "$heldout/annotations/instances_val.json" ] || PYTHONPATH=$root "$py" -c \
  "from pathlib import Path; from codetr.data.synthetic import generate_synthetic_coco; generate_synthetic_coco(Path('$heldout'), 0, 500, 256, 1)"
rm -rf "$out"
start=$(date +%s)
(cd "$tree" && OMP_NUM_THREADS=1 PYTHONPATH=$tree taskset -c "$core" "$py" -m codetr demo --out "$out" "train.seed=$seed" > "$out.log" 2>&1)
seconds=$(( $(date +%s) - start ))
(cd "$tree" && OMP_NUM_THREADS=1 PYTHONPATH=$tree taskset -c "$core" "$py" -m codetr eval "$out/config.yaml" \
  --weights "$out/model.safetensors" --out "$out/heldout" data.synthetic=false "data.val_images=$heldout/val" \
  "data.val_annotations=$heldout/annotations/instances_val.json" > /dev/null 2>&1)
median=$(grep -o '[0-9.]* s/it' "$out.log" | awk '{print $1}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
line="$(date -u +%F) $commit seed $seed: ${seconds} s, median ${median} s/it, $(grep -o 'validation AP [0-9.]*' "$out.log" | tail -1) (16 val images), \
held-out AP $("$py" -c "import json; print(json.load(open('$out/heldout/metrics.json'))['AP'])") (500 images)"
echo "$line" | tee -a "$root/bench/results/demo_runs.txt"
