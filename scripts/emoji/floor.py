"""The floor for the emoji retrieval table: a least-squares linear map between the
two towers' pooled vectors, nothing deep learned.

For each direction x -> y it pools each item's tokens (a masked mean, as the
connector pools), fits W (with a bias) minimising |X W - Y|^2 + ridge |W|^2 on the
training pairs, maps the held-out queries, and ranks the held-out targets by cosine
similarity, as `altc run` ranks them. The split is the dataset's own (metadata
`altc.held_out`: its last pairs), so the numbers sit beside altc's.

    python scripts/emoji/floor.py DATA.safetensors [--ridge 1.0] [--json]
"""

import argparse
import json
import sys

import numpy as np
from safetensors.numpy import load_file
from safetensors import safe_open


def pooled(tensors, name):
    tokens = tensors[f"{name}.tokens"].astype(np.float64)
    mask = tensors.get(f"{name}.mask")
    if mask is None:
        return tokens.mean(axis=1)
    mask = mask.astype(np.float64)[:, :, None]
    return (tokens * mask).sum(axis=1) / mask.sum(axis=1)


def least_squares(x, y, ridge):
    """W of x -> y with a bias row, by the ridge normal equations."""
    x1 = np.hstack([x, np.ones((len(x), 1))])
    gram = x1.T @ x1 + ridge * np.eye(x1.shape[1])
    return np.linalg.solve(gram, x1.T @ y)


def recalls(queries, keys, ks=(1, 5, 10)):
    """R@k of query i finding key i, cosine similarity."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    k = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    scores = q @ k.T
    # Rank of the true key: how many other keys score at least as high (ties count
    # against the query, as altc counts them).
    truth = np.diag(scores)[:, None]
    rank = (scores >= truth).sum(axis=1) - 1
    return [float((rank < k).mean()) for k in ks]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="the paired dataset altc data text wrote")
    parser.add_argument("--ridge", type=float, default=1.0)
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    with safe_open(args.data, "np") as f:
        held_out = (f.metadata() or {}).get("altc.held_out")
    if held_out is None:
        sys.exit(f"{args.data}: no fixed held-out split (altc data text --held-out writes one)")
    tensors = load_file(args.data)
    text, image = pooled(tensors, "text"), pooled(tensors, "image")
    train = slice(0, len(text) - int(held_out))
    test = slice(len(text) - int(held_out), len(text))
    result = {"held_out": int(held_out), "ridge": args.ridge}
    for direction, (x, y) in {
        "image_to_text": (image, text),
        "text_to_image": (text, image),
    }.items():
        w = least_squares(x[train], y[train], args.ridge)
        predicted = np.hstack([x[test], np.ones((int(held_out), 1))]) @ w
        result[direction] = recalls(predicted, y[test])
    if args.json:
        print(json.dumps(result))
        return
    print(f"least-squares floor, ridge {args.ridge}, {held_out} held-out pairs")
    for direction in ("image_to_text", "text_to_image"):
        r1, r5, r10 = (100 * v for v in result[direction])
        print(f"  {direction:<16} R@1 {r1:5.1f}%  R@5 {r5:5.1f}%  R@10 {r10:5.1f}%")


if __name__ == "__main__":
    main()
