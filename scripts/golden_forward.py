#!/usr/bin/env python3
"""Independent NumPy oracle for the forward pass of `models/alt_moe_tiny.ron`.

It implements the tiny Alt-MoE model straight from the math (image Graph encoder,
the shared MoE connector for both directions, MaskedMean pooling, the SmoothL1 and
InfoNCE losses and the inference embeddings), in float64, without reading any of
altc's code, and writes golden values that `compiler/tests/golden_forward.rs`
compares altc's reference interpreter with.

Run (from the repository root; needs only numpy and safetensors):

    pip install numpy safetensors
    python3 scripts/golden_forward.py            # writes the default path below
    python3 scripts/golden_forward.py OUT.safetensors

It writes `compiler/tests/golden/tiny_forward.safetensors`, every tensor float64:

    input/image.tokens [B,5,12], input/text.tokens [B,6,24], input/text.mask [B,6]
    param/<name>       every parameter of the model (7380 numbers in all)
    output/<graph>/<output>, for graph in
        image_to_text.loss, text_to_image.loss  -> loss, loss.regression,
                                                   loss.contrastive (0-d scalars)
        image_to_text.query, text_to_image.query,
        text.key, image.key                     -> embedding [B,16]

The values are deterministic: one generator, np.random.default_rng(20261124),
draws the parameters and inputs in a fixed order, so rerunning reproduces the file
byte for byte (for a given numpy). Change the model file and this script together.
"""

import math
import os
import sys

import numpy as np
from safetensors.numpy import save_file

SEED = 20261124
B = 4  # batch
EPS_LN = 1e-5
HIDDEN = 16  # connector width
EXPERTS = 4
TOP_K = 2
EXPERT_HIDDEN = 16
TEMPERATURE = 0.03
SMOOTH_L1_BETA = 1.0
LOSS_WEIGHTS = {"regression": 0.5, "contrastive": 0.5}
BRANCHES = ["prediction", "contrastive"]

# Modalities: name -> (tokens, width, padded). Image is encoded from raw features.
TEXT_TOKENS, TEXT_WIDTH = 6, 24
IMAGE_TOKENS, IMAGE_IN, IMAGE_WIDTH = 5, 12, 16
IMAGE_HEADS, IMAGE_MLP_HIDDEN = 2, 32
WIDTH = {"text": TEXT_WIDTH, "image": IMAGE_WIDTH}

# Directions: name -> (source, target, head widths).
DIRECTIONS = {
    "image_to_text": ("image", "text", {"prediction": 24, "contrastive": 16}),
    "text_to_image": ("text", "image", {"prediction": 16, "contrastive": 16}),
}
TEXT_LENGTHS = [6, 3, 1, 4]  # real tokens per batch row; the rest is padding
EXPECTED_PARAM_COUNT = 7380

DEFAULT_OUT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..", "compiler", "tests", "golden", "tiny_forward.safetensors",
)


# ----------------------------------------------------------------------------
# Parameters and inputs
# ----------------------------------------------------------------------------

def param_shapes():
    """Every parameter of the tiny model, name -> shape, in a fixed order."""
    shapes = {}

    def linear(prefix, n_in, n_out):
        shapes[f"{prefix}.weight"] = (n_in, n_out)
        shapes[f"{prefix}.bias"] = (n_out,)

    def norm(prefix, width):
        shapes[f"{prefix}.gamma"] = (width,)
        shapes[f"{prefix}.beta"] = (width,)

    enc = "encoders.image.layers"
    linear(f"{enc}.0", IMAGE_IN, IMAGE_WIDTH)
    norm(f"{enc}.1.norm", IMAGE_WIDTH)
    for proj in ["query", "key", "value", "output"]:
        linear(f"{enc}.1.{proj}", IMAGE_WIDTH, IMAGE_WIDTH)
    linear(f"{enc}.2.fc1", IMAGE_WIDTH, IMAGE_MLP_HIDDEN)
    linear(f"{enc}.2.fc2", IMAGE_MLP_HIDDEN, IMAGE_WIDTH)
    norm(f"{enc}.3.norm", IMAGE_WIDTH)

    for d, (src, _tgt, heads) in DIRECTIONS.items():
        dx = WIDTH[src]
        shapes[f"directions.{d}.embedding"] = (1, 1, dx)
        linear(f"directions.{d}.input_projection", dx, HIDDEN)
        for b in BRANCHES:
            linear(f"directions.{d}.heads.{b}", HIDDEN, heads[b])

    for b in BRANCHES:
        shapes[f"branches.{b}.task_embedding"] = (1, 1, HIDDEN)
        norm(f"branches.{b}.layer_norm", HIDDEN)

    linear("router.gate", HIDDEN, EXPERTS)
    shapes["experts.w1"] = (EXPERTS, HIDDEN, EXPERT_HIDDEN)
    shapes["experts.b1"] = (EXPERTS, EXPERT_HIDDEN)
    shapes["experts.w2"] = (EXPERTS, EXPERT_HIDDEN, HIDDEN)
    shapes["experts.b2"] = (EXPERTS, HIDDEN)

    for y in sorted({t for (_s, t, _h) in DIRECTIONS.values()}):
        linear(f"target_projections.{y}", WIDTH[y], HIDDEN)
    return shapes


def make_params(rng):
    params = {}
    for name, shape in param_shapes().items():
        leaf = name.rsplit(".", 1)[1]
        if leaf == "gamma":
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        elif leaf == "beta":
            v = 0.1 * rng.standard_normal(shape)
        elif leaf in ("bias", "b1", "b2"):
            v = 0.1 * rng.standard_normal(shape)
        else:  # weights, w1/w2, embeddings
            v = 0.3 * rng.standard_normal(shape)
        params[name] = v.astype(np.float64)
    count = sum(v.size for v in params.values())
    assert count == EXPECTED_PARAM_COUNT, f"{count} parameters, expected {EXPECTED_PARAM_COUNT}"
    return params


def make_inputs(rng):
    image = rng.standard_normal((B, IMAGE_TOKENS, IMAGE_IN))
    text = rng.standard_normal((B, TEXT_TOKENS, TEXT_WIDTH))
    mask = np.zeros((B, TEXT_TOKENS))
    for i, n in enumerate(TEXT_LENGTHS):
        mask[i, :n] = 1.0
    # Padding positions hold junk rather than zeros, so a pooling that forgets the
    # mask shows up in the goldens.
    return {"image.tokens": image, "text.tokens": text, "text.mask": mask}


# ----------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------

_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def layer_norm(x, gamma, beta, eps=EPS_LN):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)  # biased
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def softmax(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    e = np.exp(x - m)
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax(x, axis=-1):
    m = x.max(axis=axis, keepdims=True)
    s = x - m
    return s - np.log(np.exp(s).sum(axis=axis, keepdims=True))


def dense(x, P, prefix):
    return x @ P[f"{prefix}.weight"] + P[f"{prefix}.bias"]


def masked_mean(x, mask):
    """[B,L,w] -> [B,w]; mask [B,L] of 0/1, or None for an unpadded modality."""
    if mask is None:
        return x.mean(axis=1)
    m = mask[:, :, None]
    return (x * m).sum(axis=1) / np.maximum(mask.sum(axis=1), 1.0)[:, None]


def normalize(v):
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------

def self_attention(x, P, prefix, heads, mask=None):
    """Pre-norm multi-head self-attention with residual: x + Wo·MHA(LN(x))."""
    b, l, w = x.shape
    hd = w // heads
    h = layer_norm(x, P[f"{prefix}.norm.gamma"], P[f"{prefix}.norm.beta"])

    def split(t):  # [B,L,w] -> [B,H,L,hd]
        return t.reshape(b, l, heads, hd).transpose(0, 2, 1, 3)

    q = split(dense(h, P, f"{prefix}.query"))
    k = split(dense(h, P, f"{prefix}.key"))
    v = split(dense(h, P, f"{prefix}.value"))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)  # [B,H,Lq,Lk]
    if mask is not None:
        scores = scores + ((mask - 1.0) * 1e9)[:, None, None, :]
    out = softmax(scores, axis=-1) @ v  # [B,H,L,hd]
    out = out.transpose(0, 2, 1, 3).reshape(b, l, w)
    return x + dense(out, P, f"{prefix}.output")


def encode(modality, inputs, P):
    """Encoded tokens [B,L,width] of a modality."""
    if modality == "text":  # precomputed
        return inputs["text.tokens"]
    enc = "encoders.image.layers"
    x = dense(inputs["image.tokens"], P, f"{enc}.0")
    x = self_attention(x, P, f"{enc}.1", IMAGE_HEADS)
    x = x + dense(gelu(dense(x, P, f"{enc}.2.fc1")), P, f"{enc}.2.fc2")
    x = layer_norm(x, P[f"{enc}.3.norm.gamma"], P[f"{enc}.3.norm.beta"])
    return x


def mask_of(modality, inputs):
    return inputs["text.mask"] if modality == "text" else None


def route(z, P):
    """Top-k gates [B,L,E]: softmax probabilities at the k best experts, 0 elsewhere."""
    p = softmax(dense(z, P, "router.gate"), axis=-1)
    # Stable sort on -p: largest first, ties to the lower expert index.
    order = np.argsort(-p, axis=-1, kind="stable")
    chosen = order[..., :TOP_K]
    gates = np.zeros_like(p)
    np.put_along_axis(gates, chosen, np.take_along_axis(p, chosen, axis=-1), axis=-1)
    return gates, p


def moe(z, P):
    gates, _ = route(z, P)
    out = np.zeros_like(z)
    for e in range(EXPERTS):
        h = gelu(z @ P["experts.w1"][e] + P["experts.b1"][e])
        out = out + gates[..., e:e + 1] * (h @ P["experts.w2"][e] + P["experts.b2"][e])
    return out


def connector_branch(z, P, d, b):
    """Head output [B,L,width] of branch b in direction d, from the shared hidden z."""
    zb = z + P[f"branches.{b}.task_embedding"]
    o = gelu(layer_norm(moe(zb, P), P[f"branches.{b}.layer_norm.gamma"],
                        P[f"branches.{b}.layer_norm.beta"])) + zb
    return dense(o, P, f"directions.{d}.heads.{b}")


def connector(d, inputs, P):
    src, _tgt, _heads = DIRECTIONS[d]
    ex = encode(src, inputs, P)
    z = gelu(dense(ex + P[f"directions.{d}.embedding"], P, f"directions.{d}.input_projection"))
    return {b: connector_branch(z, P, d, b) for b in BRANCHES}


def key_embedding(y, inputs, P):
    ey = encode(y, inputs, P)
    return normalize(masked_mean(dense(ey, P, f"target_projections.{y}"), mask_of(y, inputs)))


def query_embedding(d, inputs, P):
    src = DIRECTIONS[d][0]
    out = connector(d, inputs, P)
    return normalize(masked_mean(out["contrastive"], mask_of(src, inputs)))


def smooth_l1(a, b, beta=SMOOTH_L1_BETA):
    d = a - b
    ad = np.abs(d)
    return np.where(ad < beta, 0.5 * d * d / beta, ad - 0.5 * beta).mean()


def info_nce(q, k, temperature=TEMPERATURE):
    logits = (normalize(q) @ normalize(k).T) / temperature
    n = logits.shape[0]
    rows = -np.mean(log_softmax(logits, axis=1)[np.arange(n), np.arange(n)])
    cols = -np.mean(log_softmax(logits, axis=0)[np.arange(n), np.arange(n)])
    return 0.5 * (rows + cols)


def direction_losses(d, inputs, P):
    src, tgt, _heads = DIRECTIONS[d]
    out = connector(d, inputs, P)
    ms, mt = mask_of(src, inputs), mask_of(tgt, inputs)
    ey = encode(tgt, inputs, P)
    regression = smooth_l1(masked_mean(out["prediction"], ms), masked_mean(ey, mt))
    q = masked_mean(out["contrastive"], ms)
    k = masked_mean(dense(ey, P, f"target_projections.{tgt}"), mt)
    contrastive = info_nce(q, k)
    total = LOSS_WEIGHTS["regression"] * regression + LOSS_WEIGHTS["contrastive"] * contrastive
    return {"loss": total, "loss.regression": regression, "loss.contrastive": contrastive}


# ----------------------------------------------------------------------------
# Sanity of the chosen values (so f32 comparisons are meaningful)
# ----------------------------------------------------------------------------

def check_routing(inputs, P):
    """Every routing decision of a real (unpadded) token must be clear-cut (no
    near-tie between the k-th and (k+1)-th expert, so f32 picks the same experts),
    and tokens must spread over more than one pair of experts. Padding tokens are
    routed too but pooled away, so their decisions cannot reach an output."""
    pairs = set()
    min_margin = math.inf
    for d, (src, _tgt, _h) in DIRECTIONS.items():
        ex = encode(src, inputs, P)
        z = gelu(dense(ex + P[f"directions.{d}.embedding"], P, f"directions.{d}.input_projection"))
        for b in BRANCHES:
            _, p = route(z + P[f"branches.{b}.task_embedding"], P)
            m = mask_of(src, inputs)
            p = p.reshape(-1, EXPERTS) if m is None else p[m > 0]
            s = np.sort(p, axis=-1)[..., ::-1]
            min_margin = min(min_margin, float((s[..., TOP_K - 1] - s[..., TOP_K]).min()))
            order = np.argsort(-p, axis=-1, kind="stable")[..., :TOP_K]
            pairs.update(tuple(sorted(r)) for r in order.reshape(-1, TOP_K).tolist())
    assert min_margin > 1e-4, f"a routing decision is a near-tie (margin {min_margin:.3g})"
    assert len(pairs) >= 3, f"tokens route to too few expert pairs: {sorted(pairs)}"
    return min_margin, sorted(pairs)


# ----------------------------------------------------------------------------

def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT
    rng = np.random.default_rng(SEED)
    P = make_params(rng)
    inputs = make_inputs(rng)
    margin, pairs = check_routing(inputs, P)

    outputs = {}
    for d in DIRECTIONS:
        for name, v in direction_losses(d, inputs, P).items():
            outputs[f"{d}.loss/{name}"] = np.asarray(v, dtype=np.float64).reshape(())
        outputs[f"{d}.query/embedding"] = query_embedding(d, inputs, P)
    for y in sorted({t for (_s, t, _h) in DIRECTIONS.values()}):
        outputs[f"{y}.key/embedding"] = key_embedding(y, inputs, P)

    tensors = {}
    tensors.update({f"input/{k}": v for k, v in inputs.items()})
    tensors.update({f"param/{k}": v for k, v in P.items()})
    tensors.update({f"output/{k}": v for k, v in outputs.items()})
    # (np.ascontiguousarray would turn the 0-d loss scalars into shape [1].)
    tensors = {k: np.array(v, dtype=np.float64, order="C") for k, v in tensors.items()}
    assert all(tensors[f"output/{d}.loss/loss"].shape == () for d in DIRECTIONS)
    for k, v in tensors.items():
        assert np.all(np.isfinite(v)), k

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    # One metadata key only: safetensors writes the metadata map in hash order, so
    # several keys would make the bytes differ from run to run.
    save_file(tensors, out_path, metadata={
        "generator": f"scripts/golden_forward.py (model alt_moe_tiny, seed {SEED}, batch {B})",
    })
    os.chmod(out_path, 0o644)  # the safetensors writer leaves it owner-only
    print(f"wrote {os.path.relpath(out_path)}: {len(tensors)} tensors")
    print(f"routing: min top-{TOP_K} margin {margin:.3g}, expert pairs used {pairs}")
    for k, v in outputs.items():
        if v.ndim == 0:
            print(f"  {k} = {float(v):.12g}")


if __name__ == "__main__":
    main()
