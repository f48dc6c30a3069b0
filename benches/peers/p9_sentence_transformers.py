"""P9 peer: sentence-transformers (PyTorch, CPU) embedding the same texts with the same
MiniLM folder and thread count. Prints one JSON line: sentences/s and where the vectors are."""
import json, sys, time

model_dir, texts_file, threads, batch, out = sys.argv[1:6]
threads, batch = int(threads), int(batch)
import torch
torch.set_num_threads(threads)
torch.set_num_interop_threads(1)
from sentence_transformers import SentenceTransformer

texts = json.load(open(texts_file))
model = SentenceTransformer(model_dir, device="cpu")
model.encode(texts[:batch], batch_size=batch)  # warm-up
best = None
for _ in range(3):
    t = time.perf_counter()
    vecs = model.encode(texts, batch_size=batch, normalize_embeddings=True, convert_to_numpy=True)
    dt = time.perf_counter() - t
    best = dt if best is None else min(best, dt)
json.dump(vecs.tolist(), open(out, "w"))
print(json.dumps({"peer": f"sentence-transformers {__import__('sentence_transformers').__version__} torch {torch.__version__}",
                  "seconds": best, "per_s": len(texts) / best}))
