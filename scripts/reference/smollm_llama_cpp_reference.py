#!/usr/bin/env python3
"""Reference greedy continuations of SmolLM2-135M-Instruct (the Q4_1 GGUF as stored) by
llama.cpp, the reference implementation of the GGUF format, written as a test fixture.

    bash benches/peers/install.sh   # llama-cpp-python into benches/peers/.venv
    bash scripts/fetch-models.sh
    benches/peers/.venv/bin/python scripts/reference/smollm_llama_cpp_reference.py \
        models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
        inference/tests/fixtures/smollm_llama_cpp_greedy.json
"""
import json
import sys

from llama_cpp import Llama, __version__

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived",
    "The three primary colours are",
]
TOKENS = 24

gguf, out = sys.argv[1:3]
llm = Llama(model_path=gguf, n_threads=1, n_ctx=512, verbose=False, seed=0)
cases = []
for prompt in PROMPTS:
    llm.reset()
    r = llm.create_completion(prompt, max_tokens=TOKENS, temperature=0.0, top_k=1)
    cases.append({"prompt": prompt, "max_tokens": TOKENS, "text": r["choices"][0]["text"]})
with open(out, "w") as f:
    json.dump({"generator": f"llama-cpp-python {__version__}", "model": gguf.split("/")[-1],
               "cases": cases}, f, indent=1, ensure_ascii=False)
    f.write("\n")
