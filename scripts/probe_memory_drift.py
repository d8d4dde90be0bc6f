"""Probe of the cross-batch memory on SciFact (a diagnostic, not a test): 11 training steps of
the main job's step (all-MiniLM-L6-v2, batch 32, one random negative, AdamW at 1.2e-4 with
warm-up, bf16 autocast), with or without ``memory_steps=1``. After each step it prints

- cos(stored, re-encoded): the remembered documents against the same documents encoded again
  by the updated model (eval mode; the stored ones carry training dropout);
- for the next batch's queries, the mean cosine to those documents as stored ("stale") and as
  re-encoded ("fresh"), and to their own positives.

    python scripts/probe_memory_drift.py 1     # with the memory
    python scripts/probe_memory_drift.py 0     # without (the control)

Figures: docs/benchmarks.md, "Cross-batch memory, on dev".
"""

import random
import sys

import torch
import torch.nn.functional as F

import contrastkit as ck
from contrastkit.data import Example
from contrastkit.models import TextEncoder
from contrastkit.recipes.retrieval_task import build_retrieval_task
from contrastkit.recipes.text_steps import RetrievalStep
from contrastkit.training import load_config
from contrastkit.training.loop import build_schedule

memory_steps = int(sys.argv[1]) if len(sys.argv) > 1 else 1
torch.manual_seed(0)
random.seed(0)
task = build_retrieval_task(load_config().data, seed=0)
ids, texts = task.corpus_ids, task.corpus_texts
examples = []
for e in task.train_examples[:32 * 12]:
    j = random.randrange(len(ids))
    examples.append(Example(e.query, e.positive, (texts[j],), query_id=e.query_id, positive_id=e.positive_id,
                            negative_ids=(ids[j],)))
enc = TextEncoder("all-MiniLM-L6-v2", normalize=True, max_length=128)
step = RetrievalStep(query_encoder=enc, objective=ck.losses.MultipleNegativesRanking(temperature=0.05),
                     query_max_length=64, doc_max_length=128, chunk_size=32, autocast_dtype=torch.bfloat16,
                     memory_steps=memory_steps)
opt = torch.optim.AdamW(enc.parameters(), lr=1.2e-4, weight_decay=0.01)
schedule = build_schedule(opt, kind="linear", total_steps=50, warmup_steps=5)


def embed(texts, length):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return F.normalize(enc(**step._tokens(enc, texts, length)).float(), dim=-1)


for s in range(11):
    batch, following = examples[32 * s:32 * (s + 1)], examples[32 * (s + 1):32 * (s + 2)]
    enc.train()
    loss = step(batch)
    opt.step()
    schedule.step()
    opt.zero_grad()
    stored = F.normalize(torch.cat(step.cache.last_embeddings[1:]).float(), dim=-1)
    enc.eval()
    fresh = embed([e.positive for e in batch] + [e.negatives[0] for e in batch], 128)
    q = embed([e.query for e in following], 64)
    pos = embed([e.positive for e in following], 128)
    print(f"step {s + 1:2d} loss {float(loss):.3f} | cos(stored, re-encoded) {float((stored * fresh).sum(1).mean()):.4f}"
          f" | next queries: cos to stored {float((q @ stored.T).mean()):.4f}, re-encoded {float((q @ fresh.T).mean()):.4f},"
          f" own positive {float((q * pos).sum(1).mean()):.4f}", flush=True)
