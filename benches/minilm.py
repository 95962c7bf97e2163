#!/usr/bin/env python3
"""all-MiniLM-L6-v2 sentences/s: altc (`altc bench ENCODER.ron`) beside PyTorch.

For each length, one batch of items of exactly that many tokens (BERT's [CLS] and
[SEP] included; the word "the" repeated, as `altc bench` builds them) is embedded
by sentence-transformers on PyTorch's CPU backend with torch's default threads, and
by altc on each device and variant asked for, in this one run on this machine.

    python3 -m venv /tmp/golden && /tmp/golden/bin/pip install torch sentence-transformers
    cargo build --release && target/release/altc import ~/.cache/altc/minilm -o minilm.ron
    /tmp/golden/bin/python benches/minilm.py --encoder minilm.ron \\
        --devices wgpu,reference --lengths 32,128 --batch 64

altc's figures come from its own table (median of --repeats runs after --warmup
runs, which lower, optimise and compile); PyTorch's the same way.
"""

import argparse
import os
import statistics
import subprocess
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402


def items_of(length: int, batch: int) -> list[str]:
    return [" ".join(["the"] * max(length - 2, 1))] * batch


def pytorch(model_dir: str, length: int, batch: int, warmup: int, repeats: int) -> float:
    model = SentenceTransformer(model_dir, device="cpu")
    model.max_seq_length = 256
    items = items_of(length, batch)
    tokens = model.tokenize(items[:1])["input_ids"].shape[1]
    assert tokens == length, f"{tokens} tokens, not {length}"
    times = []
    with torch.inference_mode():
        for run in range(warmup + repeats):
            start = time.perf_counter()
            model.encode(items, batch_size=batch, convert_to_numpy=True)
            if run >= warmup:
                times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def main() -> None:
    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", required=True, help="the encoder spec altc import wrote")
    parser.add_argument("--model-dir", default=os.path.join(cache, "altc/minilm"))
    parser.add_argument("--altc", default="target/release/altc")
    parser.add_argument("--devices", default="wgpu,reference")
    parser.add_argument("--variants", default="tuned,untuned,no-opt")
    parser.add_argument("--lengths", default="32,128")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]

    print(f"PyTorch {torch.__version__} on the CPU, {torch.get_num_threads()} threads, "
          f"batch {args.batch}")
    for length in lengths:
        rate = pytorch(args.model_dir, length, args.batch, args.warmup, args.repeats)
        print(f"  length {length}: {rate:.2f} sentences/s")
    for device in args.devices.split(","):
        # The interpreter has no kernels to tune: its row is the optimised graph.
        variants = "untuned" if device == "reference" else args.variants
        command = [args.altc, "bench", args.encoder, "--device", device,
                   "--lengths", args.lengths, "--batch-size", str(args.batch),
                   "--variants", variants, "--warmup", str(args.warmup),
                   "--repeats", str(args.repeats)]
        print(f"altc on {device}: {' '.join(command)}", flush=True)
        subprocess.run(command, check=True)


if __name__ == "__main__":
    main()
