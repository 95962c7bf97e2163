#!/usr/bin/env bash
# altc's CUDA checks, prepared on a machine without a GPU and run on the lent one in
# stages that each fit one device call (a command may run 10 minutes; a session has
# 15 minutes of device time in all, the machine's start included).
#
#   bash scripts/gpu_checks.sh pack          # here: build and stage the binaries
#   bash scripts/gpu_checks.sh correctness   # there: CUDA against the reference, tiny model
#   bash scripts/gpu_checks.sh paper         # there: paper-scale tune, bench, PyTorch
#
# `pack` puts the release `altc` and the `device_ops` and `device_tuning` test binaries
# in scratch/gpu and prints their size (a device call carries 64 MiB; /scratch is
# ignored by git, so the call must carry it). The other stages write their logs under
# $OUT, which the device tool brings back.
#
# A stage stops starting checks when its deadline nears (GPU_CHECKS_SECONDS, 520 by
# default: a device call may run 600), so a slow check costs the ones after it, never
# the whole call's output. One session's 15 minutes of device time, the machine's
# start included, fit `correctness` and most of `paper`: run `correctness` first.
set -uo pipefail

stage=${1:?usage: gpu_checks.sh pack|correctness|paper}
bin=scratch/gpu
out=${OUT:-scratch/gpu-out}
work=$(mktemp -d)
deadline=$((SECONDS + ${GPU_CHECKS_SECONDS:-520}))
mkdir -p "$out"
: >"$out/summary.txt"

# Runs one check for at most `limit` seconds (less if the stage's deadline is nearer),
# its output to the terminal and to $out/NAME.log, and its exit status and seconds to
# $out/summary.txt. A failing check is reported and the stage goes on.
check() {
    local name=$1 limit=$2
    shift 2
    local left=$((deadline - SECONDS))
    if ((left < 15)); then
        echo "== $name: skipped, the stage's deadline is near"
        echo "$name skipped 0" >>"$out/summary.txt"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status after $((SECONDS - start)) s"
    echo "$name $status $((SECONDS - start))" >>"$out/summary.txt"
}

# The executables a cargo build writes, from its JSON messages (so a custom target
# directory is followed).
executables() {
    grep -o '"executable":"[^"]*"' | sed 's/"executable":"\(.*\)"/\1/'
}

case $stage in
pack)
    altc=$(cargo build --release --bin altc --message-format=json | executables | head -n 1)
    test_binary=$(cargo test --release -p altc-runtime --test device_ops --no-run \
        --message-format=json | executables | head -n 1)
    tuning_binary=$(cargo test --release -p altc-runtime --test device_tuning --no-run \
        --message-format=json | executables | head -n 1)
    [ -x "$altc" ] && [ -x "$test_binary" ] && [ -x "$tuning_binary" ] ||
        { echo "pack: a build failed" >&2; exit 1; }
    mkdir -p "$bin"
    cp "$altc" "$bin/altc"
    cp "$test_binary" "$bin/device_ops"
    cp "$tuning_binary" "$bin/device_tuning"
    du -sh "$bin"
    ;;
correctness)
    [ -x "$bin/altc" ] || { echo "carry scratch/gpu (run the pack stage here first)" >&2; exit 1; }
    check gpu 20 nvidia-smi
    check doctor 60 "$bin/altc" doctor
    # Every op family on every device present (CUDA among them) against the reference.
    check device_ops 240 "$bin/device_ops" --test-threads 1
    # Every tuning candidate forced in turn on CUDA against the reference: what the
    # no-GPU check (`altc compile --cuda-arch`) could only compile.
    check forced_candidates 180 env ALTC_TEST_DEVICE=cuda "$bin/device_tuning" --test-threads 1
    check synth 60 "$bin/altc" data synth models/alt_moe_tiny.ron -o "$work/pairs.safetensors" \
        --pairs 4096 --seed 0
    # The README's main job on CUDA; the reference gives R@1 15.6% / 22.3%.
    check run_tiny 180 "$bin/altc" run models/alt_moe_tiny.ron --data "$work/pairs.safetensors" \
        --device cuda --steps 300
    check tune_tiny 120 "$bin/altc" tune models/alt_moe_tiny.ron --device cuda \
        --tune-cache "$work/tune"
    check bench_tiny 120 "$bin/altc" bench models/alt_moe_tiny.ron --device cuda \
        --tune-cache "$work/tune" --repeats 20 --warmup 3
    ;;
paper)
    [ -x "$bin/altc" ] || { echo "carry scratch/gpu (run the pack stage here first)" >&2; exit 1; }
    check explain_paper 30 "$bin/altc" compile models/alt_moe.ron -o "$work/alt_moe.altc" \
        --explain --bindings 1024
    check tune_paper 200 "$bin/altc" tune models/alt_moe.ron --device cuda \
        --tune-cache "$work/tune"
    # Tuned, untuned and --no-opt side by side, with the device's copy and matmul
    # ceilings and per-kernel fractions of them.
    check bench_paper 200 "$bin/altc" bench models/alt_moe.ron --device cuda \
        --tune-cache "$work/tune" --repeats 5 --warmup 2
    # The same step in PyTorch, dense and sparse experts, bf16 autocast, with the
    # device's bf16 matmul rate measured in the same script.
    check pytorch_paper 150 env PYTHONUNBUFFERED=1 python3 benches/pytorch_baseline.py \
        --config paper --device cuda --precision bf16 --form both --steps 10 --warmup 3 \
        --json "$out/pytorch_paper.json"
    ;;
*)
    echo "unknown stage $stage: pack, correctness or paper" >&2
    exit 2
    ;;
esac
rm -rf "$work"
