"""P10 peer: llama.cpp through llama-cpp-python on the same GGUF, prompt and thread count,
greedy. Prints one JSON line: prompt tokens, generated tokens, time to first token and decode
tokens/s (tokens after the first over the time after the first)."""
import json, sys, time

gguf, prompt, threads, max_tokens, runs = sys.argv[1:6]
threads, max_tokens, runs = int(threads), int(max_tokens), int(runs)
from llama_cpp import Llama, __version__

llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=2048,
            n_batch=512, verbose=False, seed=0)
results = []
for _ in range(runs + 1):  # the first run warms up
    llm.reset()
    start = time.perf_counter()
    first = None
    n = 0
    text = ""
    for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0,
                                       top_k=1, stream=True):
        now = time.perf_counter()
        if first is None:
            first = now
        n += 1
        text += chunk["choices"][0]["text"]
    end = time.perf_counter()
    results.append({"ttft": first - start, "decode_per_s": (n - 1) / (end - first), "tokens": n})
best = max(results[1:], key=lambda r: r["decode_per_s"])
print(json.dumps({"peer": f"llama-cpp-python {__version__}", "text": text, **best}))
