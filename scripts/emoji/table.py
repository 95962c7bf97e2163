"""The emoji results table: each model's final held-out recalls over its seeds (mean
and spread, from each run's metrics.jsonl), the least-squares floor, and the
paper's COCO figures for the direction of each ablation.

    python scripts/emoji/table.py RUNS_DIR

RUNS_DIR holds `<model>-seed<k>/` run directories (scripts/emoji/run_all.sh makes
them) and `floor.json` (scripts/emoji/floor.py --json).
"""

import json
import math
import pathlib
import sys

MODELS = [
    ("alt_moe", "Alt-MoE (E=12, k=4), alternating"),
    ("mlp", "MLP connector, alternating"),
    ("joint", "Alt-MoE, joint training"),
]
# arXiv 2409.05929, COCO-5K R@1 (image->text / text->image).
PAPER = {
    "alt_moe": "87.7 / 89.7",
    "mlp": "74.4 / 82.3",
    "joint": "68.2 / 74.2",
    "floor": "-",
}
DIRECTIONS = ("image_to_text", "text_to_image")


def final_recalls(run_dir):
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l]
    recall = [l for l in lines if l["kind"] == "recall"]
    if not recall:
        sys.exit(f"{run_dir}: no recalls recorded (did the run finish?)")
    last = recall[-1]
    steps = max(l["step"] for l in lines if l["kind"] == "step")
    if last["step"] != steps:
        sys.exit(f"{run_dir}: the last recalls are at step {last['step']}, not the last step {steps}")
    return last["recalls"], last["queries"], steps


def mean_spread(values):
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    root = pathlib.Path(sys.argv[1])
    header = "| connector, schedule | seeds | steps | " + " | ".join(
        f"{d.replace('_to_', '→')} R@{k}" for d in DIRECTIONS for k in (1, 5, 10)
    ) + " | paper, COCO R@1 (i→t / t→i) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    queries = None
    for key, label in MODELS:
        # Run directories only: run_all.sh keeps each run's log beside it.
        runs = sorted(p for p in root.glob(f"{key}-seed*") if p.is_dir())
        if not runs:
            continue
        per_run = [final_recalls(r) for r in runs]
        queries = per_run[0][1]
        cells = []
        for d in DIRECTIONS:
            for k in range(3):
                mean, spread = mean_spread([100 * r[0][d][k] for r in per_run])
                cells.append(f"{mean:.1f} ± {spread:.1f}")
        steps = per_run[0][2]
        print(f"| {label} | {len(runs)} | {steps} | " + " | ".join(cells) + f" | {PAPER[key]} |")
    floor = root / "floor.json"
    if floor.exists():
        f = json.loads(floor.read_text())
        cells = [f"{100 * f[d][k]:.1f}" for d in DIRECTIONS for k in range(3)]
        print(f"| least-squares linear map (floor), ridge {f['ridge']} | - | - | " + " | ".join(cells) + " | - |")
    if queries:
        print(f"\nHeld-out pairs: {queries} (chance R@1 = {100 / queries:.2f}%). Mean ± sample standard deviation over seeds.")


if __name__ == "__main__":
    main()
