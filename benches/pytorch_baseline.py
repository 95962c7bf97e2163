#!/usr/bin/env python3
"""PyTorch baseline for one Alt-MoE training step, to time side by side with altc.

It implements the model of `models/alt_moe.ron` (config `paper`) and
`models/alt_moe_tiny.ron` (config `tiny`) from the model's math (see
the README and the independent golden scripts under scripts/), with the MoE in two
forms that compute the same function:

  dense   the authors' form: every expert runs on every token (one [N,h]x[h,E*eh]
          GEMM for the first layers, one batched GEMM for the second layers), then
          the outputs are weighted by the top-k router probabilities (zero elsewhere)
          and summed;
  sparse  sparse dispatch: the N*k (token, expert) assignments are sorted by expert,
          each expert runs only on its rows, and the outputs, weighted by their gate
          probabilities, are gathered back and summed per token (no atomics).

One timed step is what altc's training graph does for the active direction: forward
of that direction (both branches), SmoothL1 + symmetric InfoNCE, backward,
clip_grad_norm_(1.0), AdamW (decoupled decay on weight matrices only), with the
warm-up/cosine learning rate and the cosine weight decay set before the step.
Directions alternate (image_to_text, text_to_image, ...), timed separately.

Usage (from the repository root):

    python3 benches/pytorch_baseline.py --check                 # f64 CPU proofs
    python3 benches/pytorch_baseline.py --config tiny --device cpu --precision f32 \
        --steps 20 --warmup 4
    python3 benches/pytorch_baseline.py --config paper --device cuda --precision bf16 \
        --form both --steps 20 --warmup 5 --json out.json

Options: --config paper|tiny, --form dense|sparse|both, --device cuda|cpu,
--precision bf16|f32 (bf16 = torch.autocast to bfloat16, parameters and optimizer
state stay f32), --steps N (timed steps per direction), --warmup N (untimed steps per
direction), --batch B (override), --compile (torch.compile the forward+loss),
--adamw auto|foreach|fused, --no-moe-bench, --matmul-size S, --threads N (CPU),
--json PATH ('-' for stdout).

Besides the step times it reports, per form, the executed and useful expert GEMM
FLOPs, the whole step's analytic matmul FLOPs, a stand-alone timing of the MoE block
(routing + experts + combine, forward and backward, one branch) with its expert-GEMM
TFLOP/s, and the device's measured dense matmul rate (bf16 on CUDA) from a large
torch.matmul in the same run, so rates can be quoted as a fraction of that.

--check (float64, CPU, tiny config, dropout off): dense and sparse forms agree on the
loss and every gradient within 1e-9 relative, for both directions; and, when
`safetensors` and the golden files are present, the forward losses match
compiler/tests/golden/tiny_forward.safetensors (NumPy oracle) and four alternating
AdamW steps match compiler/tests/golden/tiny_training.safetensors (JAX oracle:
losses, gradient norms, raw gradients, final parameters), for both forms.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------

BRANCHES = ("prediction", "contrastive")

CONFIGS = {
    # models/alt_moe.ron. Text latents (LLaMA-3-8B, 4096-d) are padded to 77 tokens
    # and pooled with a mask; image latents (DINOv2-L, 1024-d) are 257 tokens. Both
    # are precomputed ("vector pre-storage"): no encoder runs in the step.
    "paper": dict(
        hidden=2048, experts=12, top_k=4, expert_hidden=2048, dropout=0.1, batch=128,
        modalities={
            "text": dict(width=4096, tokens=77, padded=True),
            "image": dict(width=1024, tokens=257, padded=False),
        },
        image_encoder=None,
        directions={"image_to_text": ("image", "text"), "text_to_image": ("text", "image")},
        ln_eps=1e-5, temperature=0.03, smooth_l1_beta=1.0, loss_weights=(0.5, 0.5),
        # Schedule: 10 epochs with warm-up over 0.1 epoch; the dataset size is not in
        # the model file, so the benchmark uses a nominal 1000-step run (the values of
        # lr and weight decay do not change the step's cost).
        total_steps=1000, warmup_steps=10,
    ),
    # models/alt_moe_tiny.ron, complete: including its trainable image encoder Graph
    # (linear 12->16, pre-norm 2-head self-attention with residual, GELU MLP 16->32->16
    # with residual, LayerNorm), which both directions train (image is the source of
    # one and the target of the other). Steps(300), warm-up Fraction(0.1) = 30 steps.
    "tiny": dict(
        hidden=16, experts=4, top_k=2, expert_hidden=16, dropout=0.1, batch=32,
        modalities={
            "text": dict(width=24, tokens=6, padded=True),
            "image": dict(width=16, tokens=5, padded=False),
        },
        image_encoder=dict(input_width=12, heads=2, mlp_hidden=32),
        directions={"image_to_text": ("image", "text"), "text_to_image": ("text", "image")},
        ln_eps=1e-5, temperature=0.03, smooth_l1_beta=1.0, loss_weights=(0.5, 0.5),
        total_steps=300, warmup_steps=30,
    ),
}

# AdamW settings of both model files.
BETAS, ADAM_EPS, MAX_GRAD_NORM = (0.9, 0.999), 1e-8, 1.0
LR_START, LR_PEAK, LR_FINAL = 1e-3, 1.5e-3, 5.5e-6
WD_START, WD_FINAL = 0.005, 0.2


def lr_at(step, total, warmup):
    """Linear warm-up from LR_START to LR_PEAK, then cosine down to LR_FINAL."""
    if step < warmup:
        return LR_START + (LR_PEAK - LR_START) * step / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return LR_FINAL + 0.5 * (LR_PEAK - LR_FINAL) * (1.0 + math.cos(math.pi * t))


def wd_at(step, total):
    """Cosine from WD_START to WD_FINAL over the run."""
    t = min(1.0, step / max(1, total))
    return WD_FINAL + 0.5 * (WD_START - WD_FINAL) * (1.0 + math.cos(math.pi * t))


def param_shapes(cfg):
    """Every parameter, name -> shape, in the golden scripts' order and naming. Linear
    weights are listed as [in, out] like the golden files; the model stores them
    transposed (PyTorch's [out, in]), see `to_storage`."""
    s = {}
    h, eh, ne = cfg["hidden"], cfg["expert_hidden"], cfg["experts"]
    width = {m: v["width"] for m, v in cfg["modalities"].items()}

    def lin(name, i, o):
        s[name + ".weight"] = (i, o)
        s[name + ".bias"] = (o,)

    def ln(name, w):
        s[name + ".gamma"] = (w,)
        s[name + ".beta"] = (w,)

    enc = cfg["image_encoder"]
    if enc is not None:
        w, p = width["image"], "encoders.image.layers"
        lin(f"{p}.0", enc["input_width"], w)
        ln(f"{p}.1.norm", w)
        for proj in ("query", "key", "value", "output"):
            lin(f"{p}.1.{proj}", w, w)
        lin(f"{p}.2.fc1", w, enc["mlp_hidden"])
        lin(f"{p}.2.fc2", enc["mlp_hidden"], w)
        ln(f"{p}.3.norm", w)
    for d, (src, tgt) in cfg["directions"].items():
        s[f"directions.{d}.embedding"] = (1, 1, width[src])
        lin(f"directions.{d}.input_projection", width[src], h)
        lin(f"directions.{d}.heads.prediction", h, width[tgt])
        lin(f"directions.{d}.heads.contrastive", h, h)
    for b in BRANCHES:
        s[f"branches.{b}.task_embedding"] = (1, 1, h)
        ln(f"branches.{b}.layer_norm", h)
    lin("router.gate", h, ne)
    s["experts.w1"] = (ne, h, eh)
    s["experts.b1"] = (ne, eh)
    s["experts.w2"] = (ne, eh, h)
    s["experts.b2"] = (ne, h)
    for y in sorted({t for (_s, t) in cfg["directions"].values()}):
        lin(f"target_projections.{y}", width[y], h)
    return s


def to_storage(name, t):
    """Golden layout ([in, out]) -> storage layout ([out, in])."""
    if name.endswith(".weight"):
        return t.t().contiguous()
    if name in ("experts.w1", "experts.w2"):
        return t.transpose(1, 2).contiguous()
    return t


def from_storage(name, t):
    return to_storage(name, t)  # both transposes are involutions


def is_decayed(name, shape):
    """No decay for biases and for 1-D parameters (LayerNorm gains/offsets, and the
    [1,1,d] direction/task embeddings, which are vectors): only weight matrices
    (linear weights, experts.w1/w2) decay. Same membership as scripts/golden_training.py."""
    return name.rsplit(".", 1)[1] in ("weight", "w1", "w2")


def direction_param_names(cfg, d):
    src, tgt = cfg["directions"][d]
    shared = ("encoders.", "branches.", "router.", "experts.")
    own = (f"directions.{d}.", f"target_projections.{tgt}.")
    return [n for n in param_shapes(cfg) if n.startswith(shared) or n.startswith(own)]


# ----------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------

def _key(name):
    return name.replace(".", "__")


def _up(x):
    """Low-precision activations up to f32 (f32/f64 unchanged)."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


class AltMoE(torch.nn.Module):
    def __init__(self, cfg, form, dtype=torch.float32, device="cpu", seed=0):
        super().__init__()
        assert form in ("dense", "sparse")
        self.cfg, self.form = cfg, form
        self.shapes = param_shapes(cfg)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        params = {}
        for name, shape in self.shapes.items():
            leaf = name.rsplit(".", 1)[1]
            if leaf == "gamma":
                v = torch.ones(shape, dtype=torch.float64)
            elif leaf in ("beta", "bias", "b1", "b2"):
                v = torch.zeros(shape, dtype=torch.float64)
            elif leaf in ("embedding", "task_embedding"):
                v = 0.02 * torch.randn(shape, generator=gen, dtype=torch.float64)
            else:  # [in, out] or [E, in, out]: scaled by 1/sqrt(fan_in)
                v = torch.randn(shape, generator=gen, dtype=torch.float64) / math.sqrt(shape[-2])
            params[_key(name)] = torch.nn.Parameter(to_storage(name, v).to(device=device, dtype=dtype))
        self.params = torch.nn.ParameterDict(params)
        self.dropout = cfg["dropout"]

    def P(self, name):
        return self.params[_key(name)]

    def named_model_parameters(self):
        """(golden name, parameter) pairs."""
        return [(n, self.P(n)) for n in self.shapes]

    def load_golden(self, arrays):
        """arrays: golden name -> float64 tensor in [in, out] layout."""
        with torch.no_grad():
            for n, p in self.named_model_parameters():
                p.copy_(to_storage(n, arrays[n]).to(p.dtype))

    # -- building blocks ------------------------------------------------------

    def linear(self, x, name):
        return F.linear(x, self.P(name + ".weight"), self.P(name + ".bias"))

    def layer_norm(self, x, name):
        return F.layer_norm(x, x.shape[-1:], self.P(name + ".gamma"), self.P(name + ".beta"),
                            self.cfg["ln_eps"])

    def drop(self, x):
        return F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x

    # -- encoders ---------------------------------------------------------------

    def encode(self, modality, batch):
        """Encoded tokens [B, L, width] and mask [B, L] (None when unpadded)."""
        if modality == "text" or self.cfg["image_encoder"] is None:
            return batch[modality], batch.get(modality + ".mask")
        p, heads = "encoders.image.layers", self.cfg["image_encoder"]["heads"]
        x = self.linear(batch["image"], f"{p}.0")
        hn = self.layer_norm(x, f"{p}.1.norm")
        nb, nl, w = hn.shape
        hd = w // heads

        def split(t):
            return t.reshape(nb, nl, heads, hd).transpose(1, 2)

        q, k, v = (split(self.linear(hn, f"{p}.1.{n}")) for n in ("query", "key", "value"))
        att = torch.softmax(_up(q @ k.transpose(-1, -2)) / math.sqrt(hd), dim=-1)
        o = (att.to(v.dtype) @ v).transpose(1, 2).reshape(nb, nl, w)
        x = x + self.linear(o, f"{p}.1.output")
        x = x + self.linear(F.gelu(self.linear(x, f"{p}.2.fc1")), f"{p}.2.fc2")
        return self.layer_norm(x, f"{p}.3.norm"), None

    # -- the MoE ------------------------------------------------------------------

    def route(self, z):
        """Top-k indices [N,k] and their softmax probabilities [N,k], not renormalised."""
        p = torch.softmax(_up(self.linear(z, "router.gate")), dim=-1)
        vals, idx = p.topk(self.cfg["top_k"], dim=-1)
        return vals, idx, p

    def moe(self, z):
        """z [N, h] -> sum over the top-k experts of p_e * Expert_e(z), [N, h]."""
        return self.moe_dense(z) if self.form == "dense" else self.moe_sparse(z)

    def moe_dense(self, z):
        ne, eh = self.cfg["experts"], self.cfg["expert_hidden"]
        n = z.shape[0]
        vals, idx, p = self.route(z)
        gates = torch.zeros_like(p).scatter(-1, idx, vals)  # [N, E], zero off the top-k
        w1, b1 = self.P("experts.w1"), self.P("experts.b1")  # [E, eh, h], [E, eh]
        w2, b2 = self.P("experts.w2"), self.P("experts.b2")  # [E, h, eh], [E, h]
        # Every expert on every token: first layers as one GEMM against the stacked
        # weights, second layers as one batched GEMM.
        a = F.linear(z, w1.reshape(ne * eh, -1), b1.reshape(ne * eh))  # [N, E*eh]
        a = self.drop(F.gelu(a))
        a = a.reshape(n, ne, eh).transpose(0, 1)  # [E, N, eh]
        y = torch.baddbmm(b2.unsqueeze(1).to(a.dtype), a, w2.transpose(1, 2).to(a.dtype))
        y = self.drop(y)  # [E, N, h]
        return torch.einsum("ne,enh->nh", gates.to(y.dtype), y)

    def moe_sparse(self, z):
        ne, k = self.cfg["experts"], self.cfg["top_k"]
        n = z.shape[0]
        vals, idx, _p = self.route(z)
        flat = idx.reshape(-1)  # [N*k], assignment j belongs to token j // k
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat, minlength=ne).tolist()  # one host sync
        rows = z[order // k]  # [N*k, h], the tokens in expert order
        w1, b1 = self.P("experts.w1"), self.P("experts.b1")
        w2, b2 = self.P("experts.w2"), self.P("experts.b2")
        outs = []
        for e, part in enumerate(torch.split(rows, counts)):
            if counts[e] == 0:
                continue
            a = self.drop(F.gelu(F.linear(part, w1[e], b1[e])))
            outs.append(self.drop(F.linear(a, w2[e], b2[e])))
        y = torch.cat(outs, 0)  # [N*k, h], expert order
        y = y * vals.reshape(-1)[order].to(y.dtype).unsqueeze(1)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return y[inverse].reshape(n, k, -1).sum(1)  # back to token order, sum over k

    # -- the connector and losses ---------------------------------------------

    def connector(self, d, batch):
        """Head outputs {branch: [B, L, width]} of direction d, and the source mask."""
        src, _tgt = self.cfg["directions"][d]
        ex, mask = self.encode(src, batch)
        emb = self.P(f"directions.{d}.embedding")
        z = F.gelu(self.linear(ex + emb.to(ex.dtype), f"directions.{d}.input_projection"))
        nb, nl, h = z.shape
        out = {}
        for b in BRANCHES:
            zb = z + self.P(f"branches.{b}.task_embedding").to(z.dtype)
            m = self.moe(zb.reshape(nb * nl, h)).reshape(nb, nl, h)
            o = F.gelu(self.layer_norm(m, f"branches.{b}.layer_norm")) + zb
            out[b] = self.linear(o, f"directions.{d}.heads.{b}")
        return out, mask

    @staticmethod
    def pool(x, mask):
        x = _up(x)
        if mask is None:
            return x.mean(1)
        m = mask.to(x.dtype)
        return (x * m.unsqueeze(-1)).sum(1) / m.sum(1).clamp_min(1.0).unsqueeze(-1)

    def losses(self, batch, d):
        cfg = self.cfg
        _src, tgt = cfg["directions"][d]
        out, src_mask = self.connector(d, batch)
        ey, tgt_mask = self.encode(tgt, batch)
        pred = self.pool(out["prediction"], src_mask)
        q = self.pool(out["contrastive"], src_mask)
        key = self.pool(self.linear(ey, f"target_projections.{tgt}"), tgt_mask)
        target = self.pool(ey, tgt_mask)
        dev = pred.device.type
        with torch.autocast(dev, enabled=False):  # losses in f32 (or f64)
            reg = F.smooth_l1_loss(pred, target, beta=cfg["smooth_l1_beta"])
            qn = F.normalize(q, dim=-1, eps=1e-12)
            kn = F.normalize(key, dim=-1, eps=1e-12)
            logits = qn @ kn.t() / cfg["temperature"]
            labels = torch.arange(logits.shape[0], device=logits.device)
            con = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
            wr, wc = cfg["loss_weights"]
            return wr * reg + wc * con, reg, con


# ----------------------------------------------------------------------------
# Inputs, optimizer, one step
# ----------------------------------------------------------------------------

def make_batch(cfg, batch_size, device, gen, dtype=torch.float32):
    out = {}
    for m, spec in cfg["modalities"].items():
        width = spec["width"]
        if m == "image" and cfg["image_encoder"] is not None:
            width = cfg["image_encoder"]["input_width"]
        x = torch.randn((batch_size, spec["tokens"], width), generator=gen, dtype=torch.float64)
        out[m] = x.to(device=device, dtype=dtype)
        if spec["padded"]:
            lengths = torch.randint(1, spec["tokens"] + 1, (batch_size,), generator=gen)
            mask = (torch.arange(spec["tokens"]).unsqueeze(0) < lengths.unsqueeze(1))
            out[m + ".mask"] = mask.to(device=device, dtype=dtype)
    return out


def make_optimizer(model, impl):
    decay, no_decay = [], []
    for n, p in model.named_model_parameters():
        (decay if is_decayed(n, model.shapes[n]) else no_decay).append(p)
    kw = dict(lr=LR_START, betas=BETAS, eps=ADAM_EPS)
    if impl == "fused":
        kw["fused"] = True
    elif impl == "foreach":
        kw["foreach"] = True
    groups = [dict(params=decay, weight_decay=WD_START), dict(params=no_decay, weight_decay=0.0)]
    return torch.optim.AdamW(groups, **kw)


def set_schedule(opt, lr, wd):
    opt.param_groups[0]["lr"] = lr
    opt.param_groups[0]["weight_decay"] = wd
    opt.param_groups[1]["lr"] = lr


def train_step(model, opt, loss_fn, batch, d, lr, wd, autocast, keep_grads=False):
    """One step of direction d. Parameters outside d get no gradient (None), so
    clipping and AdamW skip them, like altc's per-direction training graphs."""
    opt.zero_grad(set_to_none=True)
    with autocast():
        loss, reg, con = loss_fn(batch, d)
    loss.backward()
    raw = None
    if keep_grads:
        raw = {n: p.grad.detach().clone() for n, p in model.named_model_parameters()
               if p.grad is not None}
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    set_schedule(opt, lr, wd)
    opt.step()
    return loss.detach(), reg.detach(), con.detach(), norm, raw


# ----------------------------------------------------------------------------
# FLOP accounting (analytic, matmuls only; 2 flops per multiply-add)
# ----------------------------------------------------------------------------

def step_flops(cfg, batch_size, d, form):
    """(all matmul FLOPs, executed expert FLOPs, useful expert FLOPs) of one step of d,
    forward + backward. Backward is 2x forward for a matmul whose input needs a
    gradient, 1x (weight gradient only) for one fed by data. The tiny image encoder and
    the in-batch logits are not counted."""
    src, tgt = cfg["directions"][d]
    mods = cfg["modalities"]
    h, eh, ne, k = cfg["hidden"], cfg["expert_hidden"], cfg["experts"], cfg["top_k"]
    ns, nt = batch_size * mods[src]["tokens"], batch_size * mods[tgt]["tokens"]
    dx, dy = mods[src]["width"], mods[tgt]["width"]
    fed_by_data = cfg["image_encoder"] is None or src != "image"
    total = 2 * ns * dx * h * (2 if fed_by_data else 3)  # input projection
    total += 2 * nt * dy * h * (2 if (cfg["image_encoder"] is None or tgt != "image") else 3)
    per_expert_fwd = 2 * ns * 2 * h * eh  # both layers, all tokens
    expert_exec = 2 * 3 * per_expert_fwd * (ne if form == "dense" else k)  # two branches
    expert_useful = 2 * 3 * per_expert_fwd * k
    total += expert_exec
    total += 2 * 3 * 2 * ns * h * ne  # routers
    if form == "dense":
        total += 2 * 3 * 2 * ns * ne * h  # gated sum over experts (einsum)
    total += 3 * 2 * ns * h * (dy + h)  # heads
    return total, expert_exec, expert_useful


# ----------------------------------------------------------------------------
# Timing helpers
# ----------------------------------------------------------------------------

class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        """Runs fn once; returns (seconds, result)."""
        if self.cuda:
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            r = fn()
            e.record()
            torch.cuda.synchronize()
            return s.elapsed_time(e) / 1e3, r
        t0 = time.perf_counter()
        r = fn()
        return time.perf_counter() - t0, r


def rate(flops_per_s):
    """A FLOP/s figure in readable units."""
    for unit, scale in (("TFLOP/s", 1e12), ("GFLOP/s", 1e9), ("MFLOP/s", 1e6)):
        if flops_per_s >= scale:
            return f"{flops_per_s / scale:.3g} {unit}"
    return f"{flops_per_s:.3g} FLOP/s"


def summary(seconds):
    ms = [1e3 * s for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "n": len(ms)}


def matmul_rate(device, dtype, size, reps=10):
    """Measured dense matmul rate (TFLOP/s) of a size^3 torch.matmul."""
    g = torch.Generator(device="cpu").manual_seed(1)
    a = torch.randn((size, size), generator=g).to(device=device, dtype=dtype)
    b = torch.randn((size, size), generator=g).to(device=device, dtype=dtype)
    timer = Timer(torch.device(device))
    for _ in range(3):
        torch.matmul(a, b)
    times = [timer(lambda: torch.matmul(a, b))[0] for _ in range(reps)]
    best, med = min(times), statistics.median(times)
    fl = 2.0 * size ** 3
    return {"size": size, "dtype": str(dtype).replace("torch.", ""),
            "median_tflops": fl / med / 1e12, "best_tflops": fl / best / 1e12}


def moe_block_bench(model, d, batch_size, device, autocast, reps):
    """Forward + backward of one branch's MoE block on the source tokens of d."""
    cfg = model.cfg
    src = cfg["directions"][d][0]
    n = batch_size * cfg["modalities"][src]["tokens"]
    g = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn((n, cfg["hidden"]), generator=g).to(device).requires_grad_(True)
    gy = torch.randn((n, cfg["hidden"]), generator=g).to(device)
    timer = Timer(device)

    def once():
        with autocast():
            y = model.moe(x)
        y.backward(gy.to(y.dtype))

    for _ in range(2):
        once()
    times = [timer(once)[0] for _ in range(reps)]
    model.zero_grad(set_to_none=True)
    return n, times


# ----------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------

def run_bench(args):
    cfg = CONFIGS[args.config]
    device = torch.device(args.device)
    bsz = args.batch or cfg["batch"]
    forms = ["dense", "sparse"] if args.form == "both" else [args.form]
    if args.precision == "bf16":
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        def autocast():
            return torch.autocast(device.type, enabled=False)
    impl = args.adamw
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    gen = torch.Generator(device="cpu").manual_seed(0)
    batches = [make_batch(cfg, bsz, device, gen) for _ in range(2)]
    dirs = list(cfg["directions"])

    report = {
        "config": args.config, "batch": bsz, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "precision": args.precision, "compile": args.compile,
        "adamw": impl, "threads": torch.get_num_threads(),
        "steps_per_direction": args.steps, "warmup_per_direction": args.warmup,
        "forms": {},
    }
    mm_dtype = torch.bfloat16 if (device.type == "cuda" or args.precision == "bf16") else torch.float32
    mm_size = args.matmul_size or (8192 if device.type == "cuda" else 1024)
    report["matmul"] = matmul_rate(device, mm_dtype, mm_size)
    peak = report["matmul"]["median_tflops"]
    print(f"# {args.config} batch {bsz} on {report['device_name']}, torch {torch.__version__}, "
          f"{args.precision}, AdamW {impl}{', compiled' if args.compile else ''}")
    print(f"# matmul {mm_size}^3 {report['matmul']['dtype']}: "
          f"{rate(peak * 1e12)} median ({rate(report['matmul']['best_tflops'] * 1e12)} best)")

    for form in forms:
        torch.manual_seed(0)
        model = AltMoE(cfg, form, torch.float32, device).train()
        nparams = sum(p.numel() for p in model.parameters())
        opt = make_optimizer(model, impl)
        loss_fn = model.losses
        if args.compile:
            # The sparse form's expert counts (.tolist()) break the graph; the frames
            # after the break are compiled per call site (parameter names are
            # constants), which needs more than the default number of recompiles.
            for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
                if hasattr(torch._dynamo.config, knob):
                    setattr(torch._dynamo.config, knob, max(256, getattr(torch._dynamo.config, knob)))
            loss_fn = torch.compile(model.losses)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timer = Timer(device)
        times = {d: [] for d in dirs}
        last = {}
        total_steps = (args.warmup + args.steps) * len(dirs)
        for i in range(total_steps):
            d = dirs[i % len(dirs)]
            batch = batches[(i // len(dirs)) % len(batches)]
            lr, wd = lr_at(i, cfg["total_steps"], cfg["warmup_steps"]), wd_at(i, cfg["total_steps"])
            dt, r = timer(lambda: train_step(model, opt, loss_fn, batch, d, lr, wd, autocast))
            if i >= args.warmup * len(dirs):
                times[d].append(dt)
            last[d] = r
        all_times = [t for d in dirs for t in times[d]]
        entry = {"parameters": nparams, "step": summary(all_times), "directions": {}}
        for d in dirs:
            tot, ex_exec, ex_use = step_flops(cfg, bsz, d, form)
            s = summary(times[d])
            med = s["median_ms"] / 1e3
            loss, reg, con, gnorm, _ = last[d]
            s.update({
                "matmul_flops": tot, "expert_flops_executed": ex_exec,
                "expert_flops_useful": ex_use,
                "step_tflops": tot / med / 1e12,
                "expert_tflops_executed": ex_exec / med / 1e12,
                "expert_tflops_useful": ex_use / med / 1e12,
                "last_loss": float(loss), "last_regression": float(reg),
                "last_contrastive": float(con), "last_grad_norm": float(gnorm),
            })
            s["step_fraction_of_matmul"] = s["step_tflops"] / peak
            entry["directions"][d] = s
        if device.type == "cuda":
            entry["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        del opt
        if not args.no_moe_bench:
            model.zero_grad(set_to_none=True)
            mb = {}
            for d in dirs:
                n, mt = moe_block_bench(model, d, bsz, device, autocast, max(3, args.steps // 2))
                s = summary(mt)
                ne, k = cfg["experts"], cfg["top_k"]
                fl = 3 * 2 * n * 2 * cfg["hidden"] * cfg["expert_hidden"] * (ne if form == "dense" else k)
                fl_useful = 3 * 2 * n * 2 * cfg["hidden"] * cfg["expert_hidden"] * k
                s.update({"tokens": n, "expert_flops_executed": fl,
                          "expert_tflops_executed": fl / (s["median_ms"] / 1e3) / 1e12,
                          "expert_tflops_useful": fl_useful / (s["median_ms"] / 1e3) / 1e12})
                s["executed_fraction_of_matmul"] = s["expert_tflops_executed"] / peak
                mb[d] = s
            entry["moe_block"] = mb
        report["forms"][form] = entry

        print(f"\n## form {form}: {nparams:,} parameters"
              + (f", peak memory {entry['peak_memory_gib']:.1f} GiB" if "peak_memory_gib" in entry else ""))
        st = entry["step"]
        print(f"step (both directions): median {st['median_ms']:.3f} ms "
              f"[{st['min_ms']:.3f} .. {st['max_ms']:.3f}] over {st['n']}")
        for d in dirs:
            s = entry["directions"][d]
            print(f"  {d}: median {s['median_ms']:.3f} ms [{s['min_ms']:.3f} .. {s['max_ms']:.3f}], "
                  f"matmuls {rate(s['step_tflops'] * 1e12)} ({100 * s['step_fraction_of_matmul']:.1f}% "
                  f"of measured matmul), expert GEMMs executed {rate(s['expert_tflops_executed'] * 1e12)}"
                  f" / useful {rate(s['expert_tflops_useful'] * 1e12)} over the step time; "
                  f"last loss {s['last_loss']:.6g}")
        for d, s in entry.get("moe_block", {}).items():
            print(f"  MoE block {d} ({s['tokens']} tokens, fwd+bwd, one branch): median "
                  f"{s['median_ms']:.3f} ms [{s['min_ms']:.3f} .. {s['max_ms']:.3f}], expert GEMMs "
                  f"{rate(s['expert_tflops_executed'] * 1e12)} executed "
                  f"({100 * s['executed_fraction_of_matmul']:.1f}% of measured matmul), "
                  f"{rate(s['expert_tflops_useful'] * 1e12)} useful")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
            print(f"\nwrote {args.json}")
    return report


# ----------------------------------------------------------------------------
# --check
# ----------------------------------------------------------------------------

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "compiler", "tests", "golden")
CHECK_REL = 1e-9


def rel_err(a, b, floor=0.0):
    """max|a-b| / max(max|b|, floor): a tensor-wise relative error."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = max(float(b.abs().max()), floor, 1e-300)
    return float((a - b).abs().max()) / scale


def check_dense_vs_sparse():
    cfg = CONFIGS["tiny"]
    worst = 0.0
    gen = torch.Generator(device="cpu").manual_seed(7)
    # Golden-style values (larger than the benchmark's init) so that routing spreads.
    init = {}
    for name, shape in param_shapes(cfg).items():
        leaf = name.rsplit(".", 1)[1]
        v = torch.randn(shape, generator=gen, dtype=torch.float64)
        init[name] = 1.0 + 0.1 * v if leaf == "gamma" else (
            0.1 * v if leaf in ("beta", "bias", "b1", "b2") else 0.3 * v)
    batch = make_batch(cfg, cfg["batch"], "cpu", gen, torch.float64)
    models = {}
    for form in ("dense", "sparse"):
        m = AltMoE(cfg, form, torch.float64, "cpu").eval()
        m.load_golden(init)
        models[form] = m
    for d in cfg["directions"]:
        res = {}
        for form, m in models.items():
            m.zero_grad(set_to_none=True)
            loss, reg, con = m.losses(batch, d)
            loss.backward()
            res[form] = (loss.detach(), reg.detach(), con.detach(),
                         {n: p.grad for n, p in m.named_model_parameters() if p.grad is not None})
        (ld, rd, cd, gd), (ls, rs, cs, gs) = res["dense"], res["sparse"]
        expected = set(direction_param_names(cfg, d))
        assert set(gd) == expected and set(gs) == expected, f"{d}: gradient sets differ"
        errs = [rel_err(ls, ld), rel_err(rs, rd), rel_err(cs, cd)]
        # Scale: the tensor's largest entry, or 1e-6 of the gradient's global norm if
        # larger (the image encoder's key bias has an exactly-zero gradient, so its
        # computed values are rounding noise of ~1e-17).
        gnorm = float(torch.sqrt(sum((g * g).sum() for g in gd.values())))
        errs += [rel_err(gs[n], gd[n], 1e-6 * gnorm) for n in gd]
        e = max(errs)
        worst = max(worst, e)
        # How many expert assignments there were, to show the routing is not trivial.
        with torch.no_grad():
            src = cfg["directions"][d][0]
            ex, _ = models["dense"].encode(src, batch)
            z = F.gelu(models["dense"].linear(ex + models["dense"].P(f"directions.{d}.embedding"),
                                              f"directions.{d}.input_projection"))
            used = [0] * cfg["experts"]
            for b in BRANCHES:
                zb = z + models["dense"].P(f"branches.{b}.task_embedding")
                _, idx, _ = models["dense"].route(zb.reshape(-1, cfg["hidden"]))
                used = [u + c for u, c in zip(used, torch.bincount(
                    idx.reshape(-1), minlength=cfg["experts"]).tolist())]
        print(f"dense vs sparse, {d}: loss {float(ld):.12g} (dense) {float(ls):.12g} (sparse), "
              f"{len(gd)} gradients, worst relative difference {e:.3g}; "
              f"(token, expert) assignments per expert, both branches {used}")
        assert e <= CHECK_REL, f"{d}: dense and sparse differ by {e:.3g} (> {CHECK_REL})"
    return worst


def _load_golden(name):
    path = os.path.join(GOLDEN_DIR, name)
    try:
        from safetensors.numpy import load_file
    except ImportError:
        print(f"skipped {name}: the safetensors package is not installed")
        return None
    if not os.path.exists(path):
        print(f"skipped {name}: {os.path.relpath(path)} not found")
        return None
    return {k: torch.from_numpy(v.copy()) for k, v in load_file(path).items()}


def golden_batch(t, prefix):
    return {"image": t[f"{prefix}image.tokens"], "text": t[f"{prefix}text.tokens"],
            "text.mask": t[f"{prefix}text.mask"]}


def check_golden_forward():
    t = _load_golden("tiny_forward.safetensors")
    if t is None:
        return None
    cfg = CONFIGS["tiny"]
    params = {k[len("param/"):]: v for k, v in t.items() if k.startswith("param/")}
    assert set(params) == set(param_shapes(cfg)), "golden parameters differ from the model's"
    batch = golden_batch(t, "input/")
    worst = 0.0
    for form in ("dense", "sparse"):
        m = AltMoE(cfg, form, torch.float64, "cpu").eval()
        m.load_golden(params)
        with torch.no_grad():
            for d in cfg["directions"]:
                got = dict(zip(("loss", "loss.regression", "loss.contrastive"), m.losses(batch, d)))
                for key, v in got.items():
                    want = t[f"output/{d}.loss/{key}"]
                    e = rel_err(v, want)
                    worst = max(worst, e)
                    assert e <= CHECK_REL, f"{form} {d} {key}: {float(v)!r} vs golden {float(want)!r}"
                print(f"golden forward, {form}, {d}: loss {float(got['loss']):.12g} "
                      f"(golden {float(t[f'output/{d}.loss/loss']):.12g})")
    return worst


def check_golden_training():
    t = _load_golden("tiny_training.safetensors")
    if t is None:
        return None
    cfg = CONFIGS["tiny"]
    init = {k[len("init/"):]: v for k, v in t.items() if k.startswith("init/")}
    schedule = ["image_to_text", "text_to_image", "image_to_text", "text_to_image"]
    dead = {"encoders.image.layers.1.key.bias"}  # exact gradient 0: its values are rounding noise
    worst = 0.0
    for form in ("dense", "sparse"):
        m = AltMoE(cfg, form, torch.float64, "cpu").eval()
        m.load_golden(init)
        opt = make_optimizer(m, "foreach")
        lrs = []
        for s, d in enumerate(schedule):
            p = f"step{s}/"
            lr, wd = float(t[p + "lr"]), float(t[p + "weight_decay"])
            lrs.append(lr)
            loss, reg, con, gnorm, raw = train_step(
                m, opt, m.losses, golden_batch(t, p), d, lr, wd,
                lambda: torch.autocast("cpu", enabled=False), keep_grads=True)
            for key, v in (("loss", loss), ("loss.regression", reg), ("loss.contrastive", con),
                           ("grad_norm", gnorm)):
                e = rel_err(v, t[p + key])
                worst = max(worst, e)
                assert e <= CHECK_REL, f"{form} step {s} {key}: {float(v)!r} vs {float(t[p + key])!r}"
            want = {k[len(p + "grad/"):] for k in t if k.startswith(p + "grad/")}
            assert set(raw) == want, f"{form} step {s}: gradient set differs from the golden"
            for n in want:
                if n in dead:
                    assert float(raw[n].abs().max()) < 1e-12
                    continue
                # Relative to the larger of the tensor's scale and 1e-6 of the step's norm.
                e = rel_err(from_storage(n, raw[n]), t[p + "grad/" + n], 1e-6 * float(t[p + "grad_norm"]))
                worst = max(worst, e)
                assert e <= CHECK_REL, f"{form} step {s} grad {n}: {e:.3g}"
        for n, prm in m.named_model_parameters():
            got, want = from_storage(n, prm.detach()), t["final/" + n]
            if n in dead:
                assert float((got - want).abs().max()) <= 2 * sum(lrs), n
                continue
            e = rel_err(got, want, 1.0)
            worst = max(worst, e)
            assert e <= CHECK_REL, f"{form} final {n}: {e:.3g}"
        print(f"golden training, {form}: 4 alternating AdamW steps, losses "
              + ", ".join(f"{float(t[f'step{s}/loss']):.10g}" for s in range(4))
              + " and every gradient and final parameter match")
    return worst


def run_check():
    torch.set_default_dtype(torch.float64)
    w1 = check_dense_vs_sparse()
    w2 = check_golden_forward()
    w3 = check_golden_training()
    print("worst relative differences: dense vs sparse {:.3g}; golden forward {}; golden training {}"
          .format(w1, "skipped" if w2 is None else f"{w2:.3g}",
                  "skipped" if w3 is None else f"{w3:.3g}"))
    print(f"check passed (tolerance {CHECK_REL:g} relative)")


# ----------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", choices=sorted(CONFIGS), default="paper")
    ap.add_argument("--form", choices=["dense", "sparse", "both"], default="both")
    ap.add_argument("--device", choices=["cuda", "cpu"],
                    default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", choices=["bf16", "f32"], default=None,
                    help="default: bf16 on cuda, f32 on cpu")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per direction")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per direction")
    ap.add_argument("--batch", type=int, default=None, help="override the config's batch")
    ap.add_argument("--compile", action="store_true", help="torch.compile the forward + losses")
    ap.add_argument("--adamw", choices=["auto", "foreach", "fused"], default="auto")
    ap.add_argument("--no-moe-bench", action="store_true", help="skip the stand-alone MoE timing")
    ap.add_argument("--matmul-size", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--json", default=None, help="write the report as JSON to PATH ('-': stdout)")
    ap.add_argument("--check", action="store_true",
                    help="f64 CPU proofs: dense == sparse, and the golden files")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check:
        run_check()
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("CUDA is not available (use --device cpu)")
    if args.precision is None:
        args.precision = "bf16" if args.device == "cuda" else "f32"
    if args.steps < 1 or args.warmup < 0:
        sys.exit("--steps must be >= 1 and --warmup >= 0")
    run_bench(args)


if __name__ == "__main__":
    main()
