#!/usr/bin/env bash
# The emoji experiment after the dataset (examples/emoji/README.md): Alt-MoE, the MLP
# connector and joint training, each over seeds 0 1 2, plots of every run, the
# least-squares floor and the table. Runs go two at a time on a machine with more
# than two cores (JOBS overrides).
#
#   bash scripts/emoji/run_all.sh DATA.safetensors RUNS_DIR
set -euo pipefail
# Paths as given, from where the script was started, before it moves to the root.
data=$(realpath "${1:?usage: run_all.sh DATA.safetensors RUNS_DIR}")
runs=$(realpath -m "${2:?usage: run_all.sh DATA.safetensors RUNS_DIR}")
cd "$(dirname "$0")/../.."
altc=$(realpath "${ALTC:-target/release/altc}")
venv="${XDG_CACHE_HOME:-$HOME/.cache}/altc/emoji-venv"
device=${DEVICE:-reference}
jobs=${JOBS:-$(($(nproc) > 2 ? 2 : 1))}
mkdir -p "$runs"

train() {
    local model=$1 seed=$2
    local dir="$runs/$model-seed$seed"
    "$altc" run "examples/emoji/$model.ron" --data "$data" --device "$device" \
        --seed "$seed" --out "$dir" --eval-every 100 --force >"$dir.log" 2>&1 \
        || { echo "run_all: $model seed $seed failed; see $dir.log" >&2; return 1; }
    "$altc" plot "$dir" >>"$dir.log" 2>&1 \
        || { echo "run_all: plotting $model seed $seed failed; see $dir.log" >&2; return 1; }
    echo "$model seed $seed: $(grep -A2 'held-out retrieval' "$dir.log" | tail -2 | tr -s ' ' | tr '\n' ';')"
}
export -f train
export altc data device runs

for model in alt_moe mlp joint; do
    for seed in 0 1 2; do
        echo "$model $seed"
    done
done | xargs -P "$jobs" -L 1 bash -c 'train "$0" "$1"'

"$venv/bin/python" scripts/emoji/floor.py "$data" --json >"$runs/floor.json"
"$venv/bin/python" scripts/emoji/table.py "$runs" | tee "$runs/table.md"
