#!/usr/bin/env python3
"""Golden token ids and sentence embeddings of all-MiniLM-L6-v2 from PyTorch.

sentence-transformers (on PyTorch, CPU, float32) encodes the sentences in
`runtime/tests/golden/minilm_sentences.jsonl` with the model that `scripts/setup.sh`
unpacks into ~/.cache/altc/minilm, and writes what altc must reproduce:

    ids        [N, 256] int32   token ids, zero after each item's length
    lengths    [N]      int32   tokens per item, special tokens included
    embedding  [N, 384] float32 mean-pooled, L2-normalised sentence embeddings

to `runtime/tests/golden/minilm_golden.safetensors`. The sentences include the empty
string, accents and other Unicode, and one item longer than the model's 256 tokens.

Run offline (no hub access is needed; the model is read from the folder):

    python3 -m venv /tmp/golden && /tmp/golden/bin/pip install torch sentence-transformers
    /tmp/golden/bin/python scripts/golden_minilm.py [MODEL_DIR] [OUT.safetensors]
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402
from sentence_transformers import SentenceTransformer, models  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTENCES = os.path.join(ROOT, "runtime/tests/golden/minilm_sentences.jsonl")
MAX_LENGTH = 256


def main() -> None:
    cache = os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache"))
    model_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(cache, "altc/minilm")
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(
        ROOT, "runtime/tests/golden/minilm_golden.safetensors")
    with open(SENTENCES, encoding="utf-8") as f:
        sentences = [json.loads(line)["text"] for line in f]

    # The model folder as sentence-transformers' own pipeline: BERT, mean pooling
    # over the attention mask, L2 normalisation (modules.json of the package).
    word = models.Transformer(model_dir, max_seq_length=MAX_LENGTH)
    pooling = models.Pooling(word.get_embedding_dimension(), pooling_mode="mean")
    model = SentenceTransformer(modules=[word, pooling, models.Normalize()], device="cpu")
    model.eval()

    features = model.preprocess(sentences)
    ids = features["input_ids"].numpy()
    mask = features["attention_mask"].numpy()
    lengths = mask.sum(axis=1).astype(np.int32)
    padded = np.zeros((len(sentences), MAX_LENGTH), dtype=np.int32)
    padded[:, : ids.shape[1]] = ids * mask
    with torch.no_grad():
        embedding = model.encode(sentences, batch_size=16, convert_to_numpy=True)
    save_file(
        {
            "ids": padded,
            "lengths": lengths,
            "embedding": embedding.astype(np.float32),
        },
        out,
    )
    print(f"wrote {out}: {len(sentences)} sentences, longest {lengths.max()} tokens, "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
