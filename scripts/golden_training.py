#!/usr/bin/env python3
"""Independent JAX oracle for four alternating AdamW training steps of the tiny model.

It implements `models/alt_moe_tiny.ron` (eval mode: dropout off) straight from the
model's math in float64 JAX, takes gradients with `jax.grad` (not with altc's
autodiff), clips them by global norm like PyTorch's `clip_grad_norm_` and applies
PyTorch's AdamW with per-parameter step counters, alternating the two directions:

    step 0 image_to_text, step 1 text_to_image, step 2 image_to_text, step 3 text_to_image

Each step uses a fresh batch and its own learning rate and weight decay, and only
updates the parameters its direction's loss depends on (the others, their moments
and their step counters stay as they are). `compiler/tests/golden_training.rs` runs
altc's training graphs on the reference interpreter and compares with the values
written here.

Run (from the repository root; needs jax (CPU is enough), numpy and safetensors):

    pip install jax numpy safetensors
    python3 scripts/golden_training.py            # writes the default path below
    python3 scripts/golden_training.py OUT.safetensors

It writes `compiler/tests/golden/tiny_training.safetensors`, every tensor float64
(scalars 0-d):

    init/<param>                 every parameter before step 0 (7380 numbers)
    step{s}/image.tokens [4,5,12], step{s}/text.tokens [4,6,24], step{s}/text.mask [4,6]
    step{s}/lr, step{s}/weight_decay
    step{s}/loss, step{s}/loss.regression, step{s}/loss.contrastive
    step{s}/grad_norm            the global norm of the step's gradients, unclipped
    step{s}/grad/<param>         the raw (unclipped) gradient of every parameter of
                                 step s's direction, and of no other
    final/<param>                every parameter after the four steps

Besides writing the file it checks that the chosen values make a meaningful f32
comparison: every routing decision of a real token is clear-cut at every step, the
parameter sets of the two directions are exactly the expected ones, and the same
training run in float32 JAX stays within the f32 test tolerance of the f64 values.

The values are deterministic: one generator, np.random.default_rng(20261125),
draws the parameters and then the four batches in a fixed order.
"""

import math
import os
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

SEED = 20261125
B = 4
STEPS = 4
LRS = [1e-2, 1.2e-2, 1.1e-2, 0.9e-2]
WEIGHT_DECAYS = [0.05, 0.06, 0.07, 0.08]
BETA1, BETA2, ADAM_EPS = 0.9, 0.999, 1e-8
MAX_GRAD_NORM = 1.0

LN_EPS = 1e-5
H = 16  # connector hidden width
N_EXPERTS = 4
TOP_K = 2
EXPERT_HIDDEN = 16
TAU = 0.03
W_REGRESSION, W_CONTRASTIVE = 0.5, 0.5

TEXT_LEN, TEXT_W = 6, 24
IMG_LEN, IMG_IN, IMG_W = 5, 12, 16
IMG_HEADS, IMG_MLP = 2, 32
WIDTHS = {"text": TEXT_W, "image": IMG_W}
DIRS = {  # name -> (source, target, head widths)
    "image_to_text": ("image", "text", {"prediction": 24, "contrastive": 16}),
    "text_to_image": ("text", "image", {"prediction": 16, "contrastive": 16}),
}
SCHEDULE = ["image_to_text", "text_to_image", "image_to_text", "text_to_image"]
BRANCHES = ("prediction", "contrastive")
# Real tokens per batch row at each step (padding positions hold random junk).
TEXT_LENGTHS = [[6, 3, 1, 4], [2, 6, 5, 1], [4, 1, 6, 3], [5, 2, 3, 6]]
PARAM_COUNT = 7380

# The tolerance of compiler/tests/golden_training.rs for f32 (|a-b| <= rel *
# max(|b|, floor)); the float32 JAX self-check below must stay well inside it.
F32_REL, F32_FLOOR = 1e-4, 1.0

# Parameters whose gradient is zero in exact arithmetic: a key bias adds q.b_k to
# every score of a query, which the softmax over keys cancels. Their computed
# gradient is pure rounding noise (~1e-16 in f64, ~1e-8 in f32, where AdamW's
# normalisation turns it into moves of up to ~lr per step), so the f32 test bounds
# their final values rather than matching them.
DEAD = {"encoders.image.layers.1.key.bias"}

DEFAULT_OUT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..", "compiler", "tests", "golden", "tiny_training.safetensors",
)

ENC = "encoders.image.layers"


# ----------------------------------------------------------------------------
# Parameters, decay membership and batches
# ----------------------------------------------------------------------------

def shapes():
    """name -> shape of every parameter, in a fixed order (the draw order)."""
    s = {}

    def lin(name, i, o):
        s[name + ".weight"] = (i, o)
        s[name + ".bias"] = (o,)

    def ln(name, w):
        s[name + ".gamma"] = (w,)
        s[name + ".beta"] = (w,)

    lin(f"{ENC}.0", IMG_IN, IMG_W)
    ln(f"{ENC}.1.norm", IMG_W)
    for proj in ("query", "key", "value", "output"):
        lin(f"{ENC}.1.{proj}", IMG_W, IMG_W)
    lin(f"{ENC}.2.fc1", IMG_W, IMG_MLP)
    lin(f"{ENC}.2.fc2", IMG_MLP, IMG_W)
    ln(f"{ENC}.3.norm", IMG_W)
    for d, (src, _, heads) in DIRS.items():
        s[f"directions.{d}.embedding"] = (1, 1, WIDTHS[src])
        lin(f"directions.{d}.input_projection", WIDTHS[src], H)
        for b in BRANCHES:
            lin(f"directions.{d}.heads.{b}", H, heads[b])
    for b in BRANCHES:
        s[f"branches.{b}.task_embedding"] = (1, 1, H)
        ln(f"branches.{b}.layer_norm", H)
    lin("router.gate", H, N_EXPERTS)
    s["experts.w1"] = (N_EXPERTS, H, EXPERT_HIDDEN)
    s["experts.b1"] = (N_EXPERTS, EXPERT_HIDDEN)
    s["experts.w2"] = (N_EXPERTS, EXPERT_HIDDEN, H)
    s["experts.b2"] = (N_EXPERTS, H)
    lin("target_projections.text", TEXT_W, H)
    lin("target_projections.image", IMG_W, H)
    return s


def init_params(rng):
    out = {}
    for name, shape in shapes().items():
        leaf = name.rsplit(".", 1)[1]
        if leaf == "gamma":
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        elif leaf in ("beta", "bias", "b1", "b2"):
            v = 0.1 * rng.standard_normal(shape)
        else:  # weight, w1, w2, embedding, task_embedding
            v = 0.3 * rng.standard_normal(shape)
        out[name] = np.asarray(v, dtype=np.float64)
    n = sum(v.size for v in out.values())
    assert n == PARAM_COUNT, f"{n} parameters, expected {PARAM_COUNT}"
    return out


def decayed(name, shape):
    """AdamW decays 2-D linear weights and the expert matrices only."""
    if name in ("experts.w1", "experts.w2"):
        return True
    return name.endswith(".weight") and len(shape) == 2


def direction_params(d):
    """Every parameter that direction d's loss depends on."""
    src, tgt, _ = DIRS[d]
    shared = ("encoders.image.", "branches.", "router.", "experts.")
    own = (f"directions.{d}.", f"target_projections.{tgt}.")
    assert "image" in (src, tgt)  # both directions see the image encoder
    return [n for n in shapes() if n.startswith(shared) or n.startswith(own)]


def make_batch(rng, lengths):
    image = rng.standard_normal((B, IMG_LEN, IMG_IN))
    text = rng.standard_normal((B, TEXT_LEN, TEXT_W))
    mask = np.zeros((B, TEXT_LEN))
    for i, n in enumerate(lengths):
        assert 1 <= n <= TEXT_LEN
        mask[i, :n] = 1.0
    return {"image.tokens": image, "text.tokens": text, "text.mask": mask}


# ----------------------------------------------------------------------------
# The model, in jax.numpy (dtype follows the inputs: float64, or float32 for the
# self-check)
# ----------------------------------------------------------------------------

def gelu(x):
    return 0.5 * x * (1.0 + jax.scipy.special.erf(x / math.sqrt(2.0)))


def norm(x, g, b):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + LN_EPS) * g + b


def linear(P, name, x):
    return jnp.matmul(x, P[name + ".weight"]) + P[name + ".bias"]


def image_encoder(P, raw):
    x = linear(P, f"{ENC}.0", raw)
    # Pre-norm two-head self-attention with a residual.
    h = norm(x, P[f"{ENC}.1.norm.gamma"], P[f"{ENC}.1.norm.beta"])
    nb, nl, w = h.shape
    hd = w // IMG_HEADS

    def heads(t):  # [B,L,w] -> [B,heads,L,hd]
        return jnp.transpose(jnp.reshape(t, (nb, nl, IMG_HEADS, hd)), (0, 2, 1, 3))

    q = heads(linear(P, f"{ENC}.1.query", h))
    k = heads(linear(P, f"{ENC}.1.key", h))
    v = heads(linear(P, f"{ENC}.1.value", h))
    att = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(hd), axis=-1)
    o = jnp.einsum("bhqk,bhkd->bhqd", att, v)
    o = jnp.reshape(jnp.transpose(o, (0, 2, 1, 3)), (nb, nl, w))
    x = x + linear(P, f"{ENC}.1.output", o)
    # MLP block with residual, then the final LayerNorm.
    x = x + linear(P, f"{ENC}.2.fc2", gelu(linear(P, f"{ENC}.2.fc1", x)))
    return norm(x, P[f"{ENC}.3.norm.gamma"], P[f"{ENC}.3.norm.beta"])


def encoded(P, batch, modality):
    if modality == "text":
        return batch["text.tokens"], batch["text.mask"]
    return image_encoder(P, batch["image.tokens"]), None


def pool(x, mask):
    if mask is None:
        return jnp.mean(x, axis=1)
    total = jnp.einsum("blw,bl->bw", x, mask)
    count = jnp.maximum(jnp.sum(mask, axis=1), 1.0)
    return total / count[:, None]


def gates(P, z):
    """Softmax router probabilities kept at each token's two best experts."""
    p = jax.nn.softmax(linear(P, "router.gate", z), axis=-1)
    order = jnp.argsort(-jax.lax.stop_gradient(p), axis=-1, stable=True)
    keep = jnp.sum(jax.nn.one_hot(order[..., :TOP_K], N_EXPERTS, dtype=p.dtype), axis=-2)
    return p * jax.lax.stop_gradient(keep), p


def mixture(P, z):
    g, _ = gates(P, z)
    hidden = gelu(jnp.einsum("blh,ehk->blek", z, P["experts.w1"]) + P["experts.b1"])
    out = jnp.einsum("blek,ekh->bleh", hidden, P["experts.w2"]) + P["experts.b2"]
    return jnp.einsum("ble,bleh->blh", g, out)


def hidden_of(P, batch, d):
    src = DIRS[d][0]
    ex, _ = encoded(P, batch, src)
    return gelu(linear(P, f"directions.{d}.input_projection",
                       ex + P[f"directions.{d}.embedding"]))


def unit_rows(v):
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def losses(P, batch, d):
    src, tgt, _ = DIRS[d]
    _, src_mask = encoded(P, batch, src)
    ey, tgt_mask = encoded(P, batch, tgt)
    z = hidden_of(P, batch, d)
    outs = {}
    for b in BRANCHES:
        zb = z + P[f"branches.{b}.task_embedding"]
        ob = gelu(norm(mixture(P, zb), P[f"branches.{b}.layer_norm.gamma"],
                       P[f"branches.{b}.layer_norm.beta"])) + zb
        outs[b] = linear(P, f"directions.{d}.heads.{b}", ob)

    diff = pool(outs["prediction"], src_mask) - pool(ey, tgt_mask)
    ad = jnp.abs(diff)
    regression = jnp.mean(jnp.where(ad < 1.0, 0.5 * diff * diff, ad - 0.5))

    q = unit_rows(pool(outs["contrastive"], src_mask))
    k = unit_rows(pool(linear(P, f"target_projections.{tgt}", ey), tgt_mask))
    logits = (q @ k.T) / TAU
    rows = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
    cols = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
    contrastive = 0.5 * (rows + cols)
    total = W_REGRESSION * regression + W_CONTRASTIVE * contrastive
    return total, (regression, contrastive)


_GRAD = {
    d: jax.jit(jax.value_and_grad(lambda P, batch, d=d: losses(P, batch, d), has_aux=True))
    for d in DIRS
}


# ----------------------------------------------------------------------------
# Training: global-norm clipping and PyTorch AdamW with per-parameter steps
# ----------------------------------------------------------------------------

def train(params, batches, dtype):
    """Runs the four steps in `dtype`; returns (per-step records, final params).
    Parameters, moments and arithmetic stay in `dtype` (numpy arrays of it)."""
    P = {n: np.asarray(v, dtype=dtype) for n, v in params.items()}
    m = {n: np.zeros_like(v) for n, v in P.items()}
    v2 = {n: np.zeros_like(v) for n, v in P.items()}
    t = {n: 0 for n in P}
    shape_of = shapes()
    records = []
    for s, d in enumerate(SCHEDULE):
        before = dict(P)
        batch = {k: jnp.asarray(x, dtype=dtype) for k, x in batches[s].items()}
        (loss, (reg, con)), grads = _GRAD[d](P, batch)
        grads = {n: np.asarray(g) for n, g in grads.items()}
        names = direction_params(d)
        # Exactly the direction's parameters can have a gradient.
        for n in P:
            if n not in names:
                assert not np.any(grads[n]), f"step {s}: {n} is outside {d} but has a gradient"
        for n in names:
            top = float(np.max(np.abs(grads[n])))
            if n in DEAD:
                assert top < (1e-12 if dtype == np.float64 else 1e-6), f"{n}: {top}"
            else:
                assert top > 1e-6, f"step {s}: {n} of {d} has a (near) zero gradient"
        one = dtype(1.0)
        lr, wd = dtype(LRS[s]), dtype(WEIGHT_DECAYS[s])
        total = np.sqrt(sum(np.sum(np.square(grads[n]), dtype=dtype) for n in names), dtype=dtype)
        coef = np.minimum(dtype(MAX_GRAD_NORM) / (total + dtype(1e-6)), one)
        for n in names:
            g = grads[n] * coef
            t[n] += 1
            p = P[n]
            if decayed(n, shape_of[n]):
                p = p * (one - lr * wd)
            m[n] = dtype(BETA1) * m[n] + dtype(1 - BETA1) * g
            v2[n] = dtype(BETA2) * v2[n] + dtype(1 - BETA2) * np.square(g)
            bc1 = one - dtype(BETA1) ** dtype(t[n])
            bc2 = one - dtype(BETA2) ** dtype(t[n])
            denom = np.sqrt(v2[n]) / np.sqrt(bc2) + dtype(ADAM_EPS)
            P[n] = (p - (lr / bc1) * (m[n] / denom)).astype(dtype)
        records.append({
            "direction": d,
            "loss": float(loss), "loss.regression": float(reg),
            "loss.contrastive": float(con), "grad_norm": float(total),
            "grads": {n: grads[n] for n in names},
            "params_before": before,
        })
    return records, P


def routing_margin(params_by_step, batches):
    """Smallest gap between the 2nd and 3rd router probability of any real token, over
    every step, branch and its parameters at that step, and the expert pairs used."""
    margin, pairs = math.inf, set()
    for s, d in enumerate(SCHEDULE):
        P = params_by_step[s]
        batch = {k: jnp.asarray(x) for k, x in batches[s].items()}
        src = DIRS[d][0]
        z = hidden_of(P, batch, d)
        for b in BRANCHES:
            _, p = gates(P, z + P[f"branches.{b}.task_embedding"])
            p = np.asarray(p)
            p = p.reshape(-1, N_EXPERTS) if src == "image" else p[batches[s]["text.mask"] > 0]
            top = -np.sort(-p, axis=-1)
            margin = min(margin, float((top[:, TOP_K - 1] - top[:, TOP_K]).min()))
            order = np.argsort(-p, axis=-1, kind="stable")[:, :TOP_K]
            pairs.update(tuple(sorted(r)) for r in order.tolist())
    return margin, sorted(pairs)


def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT
    rng = np.random.default_rng(SEED)
    init = init_params(rng)
    batches = [make_batch(rng, TEXT_LENGTHS[s]) for s in range(STEPS)]

    records, final = train(init, batches, np.float64)

    margin, pairs = routing_margin([r["params_before"] for r in records], batches)
    assert margin > 1e-3, f"a routing decision is a near-tie (margin {margin:.3g})"
    assert len(pairs) >= 3, f"tokens route to too few expert pairs: {pairs}"

    # The same run in float32 must stay inside the f32 test tolerance, or the f32
    # comparison in golden_training.rs would test rounding luck rather than altc.
    records32, final32 = train(init, batches, np.float32)
    worst32 = 0.0

    def worse(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), F32_FLOOR)))

    for r32, r in zip(records32, records):
        for key in ("loss", "loss.regression", "loss.contrastive", "grad_norm"):
            worst32 = max(worst32, worse(r32[key], r[key]))
        for n, g in r["grads"].items():
            worst32 = max(worst32, worse(r32["grads"][n], g))
    for n, p in final.items():
        if n in DEAD:  # noise-driven in f32: bounded by the AdamW step sizes
            assert np.max(np.abs(final32[n] - p)) <= 2 * sum(LRS), n
        else:
            worst32 = max(worst32, worse(final32[n], p))
    assert worst32 < F32_REL / 4, f"float32 JAX is {worst32:.3g} off the f64 run"

    tensors = {}
    for n, v in init.items():
        tensors[f"init/{n}"] = v
    for s, (batch, r) in enumerate(zip(batches, records)):
        for k, x in batch.items():
            tensors[f"step{s}/{k}"] = x
        tensors[f"step{s}/lr"] = np.array(LRS[s])
        tensors[f"step{s}/weight_decay"] = np.array(WEIGHT_DECAYS[s])
        for key in ("loss", "loss.regression", "loss.contrastive", "grad_norm"):
            tensors[f"step{s}/{key}"] = np.array(r[key])
        for n, g in r["grads"].items():
            tensors[f"step{s}/grad/{n}"] = g
    for n, v in final.items():
        tensors[f"final/{n}"] = v
    # np.array (not ascontiguousarray) keeps the scalars 0-d.
    tensors = {k: np.array(v, dtype=np.float64, order="C") for k, v in tensors.items()}
    for k, v in tensors.items():
        assert np.all(np.isfinite(v)), k

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    # One metadata key only: several would be written in hash order (not reproducible).
    save_file(tensors, out_path, metadata={
        "generator": f"scripts/golden_training.py (model alt_moe_tiny, seed {SEED}, "
                     f"batch {B}, {STEPS} alternating AdamW steps, jax {jax.__version__})",
    })
    os.chmod(out_path, 0o644)
    size = os.path.getsize(out_path)
    print(f"wrote {os.path.relpath(out_path)}: {len(tensors)} tensors, {size} bytes")
    print(f"routing: min top-{TOP_K} margin {margin:.3g} over all steps, pairs {pairs}")
    print(f"float32 JAX vs float64: worst {worst32:.3g} (|a-b| / max(|b|, {F32_FLOOR}))")
    for s, r in enumerate(records):
        print(f"  step {s} {r['direction']}: loss {r['loss']:.12g} "
              f"(regression {r['loss.regression']:.12g}, contrastive "
              f"{r['loss.contrastive']:.12g}), grad_norm {r['grad_norm']:.12g}")


if __name__ == "__main__":
    main()
