#!/usr/bin/env bash
# Installs the Python peers of the inference benchmarks into benches/peers/.venv (git-ignored):
#   P9  sentence-transformers on PyTorch (CPU), same MiniLM folder, same texts and threads
#   P10 llama.cpp through llama-cpp-python (built from source: PyPI ships only an sdist;
#       pip fetches cmake and ninja wheels for the build), same GGUF, same threads
#   P14 llama.cpp's OpenAI-compatible server (llama_cpp.server, the package's `server` extra)
# Idempotent. Takes several minutes the first time (llama.cpp compiles on 2 cores).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# PyTorch's CPU-only wheels live on download.pytorch.org, which this network does not reach;
# the PyPI wheel (with its CUDA libraries) runs on the CPU as well.
.venv/bin/python -m pip install --quiet "numpy<2.4" "sentence-transformers==5.1.2" torch
CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_OPENMP=OFF" \
    .venv/bin/python -m pip install --quiet "llama-cpp-python[server]==0.3.16"
.venv/bin/python -c "import torch, sentence_transformers, llama_cpp; print('torch', torch.__version__, 'sentence-transformers', sentence_transformers.__version__, 'llama-cpp-python', llama_cpp.__version__)"
