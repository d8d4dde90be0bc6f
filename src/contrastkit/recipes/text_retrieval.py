"""The main job: adapt a text embedding model to a corpus and prove, with numbers, that
it got better.

Phases (each timed, logged to ``metrics.jsonl`` and summed in ``metrics.json``):

1. ``load``: the retrieval task (:mod:`~contrastkit.recipes.retrieval_task`: corpus,
   queries, train / dev / test qrels; dev carved from train) and the base model.
2. ``encode_corpus``: the corpus once with the base model (bfloat16 where the hardware
   runs it fast); these embeddings serve the "before" evaluation, mining, the dev corpus
   and the false-negative guide.
3. ``before``: test nDCG@10 / MRR@10 / Recall@100 (and every metric@k) and STS-B test
   Spearman of the base model.
4. ``mine``: hard negatives from a rank window (default: the top-ranked non-positive),
   optionally with a relative / absolute margin false-negative filter
   (:func:`contrastkit.negatives.mining.mine_hard_negatives`).
5. ``train``: gradient-cached steps of the tiled objective (default MNRL with the mined
   negatives as extra columns), false negatives masked in the loss, AdamW with warm-up and
   decay, dev evaluation, best checkpoint by dev nDCG@10, atomic checkpoints, ``--resume``.
6. ``interpolate``: WiSE-FT, ``(1 - a) base + a tuned`` with ``a`` chosen on dev.
7. ``after``: the same test metrics for the final model with a paired bootstrap 95%
   interval of each difference, and STS-B again (the forgetting guard).

The test qrels are used in phases 3 and 7 only: nothing is trained, mined, tuned or
selected on them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

import torch
from torch import Tensor

from ..data import Example, load_sts
from ..data.readers import corpus_file
from ..evaluation import evaluate_retrieval, evaluate_sts, paired_bootstrap
from ..models import TextEncoder
from ..models.precision import autocast_dtype, cpu_has_fast_bf16
from ..negatives.mining import known_positives, mine_hard_negatives
from ..negatives.samplers import B3BatchSampler, NoDuplicatesBatchSampler, RandomBatchSampler
from ..negatives.stream_sampler import ShuffleBufferBatches
from ..training.config import ConfigError, RunConfig, dump_config
from ..training.interpolation import snapshot
from ..training.loop import Trainer, build_schedule
from ..training.run_folder import RunFolder, atomic_replace_dir
from ..training.timing import PhaseTimer
from .common import (ExampleBatches, best_then_interpolate, broadcast, build_objective, build_optimizer,
                     check_objective_fits, column_loss, save_towers, start_run, versions)
from .retrieval_task import RetrievalTask, build_retrieval_task
from .text_steps import Guide, RetrievalStep, fill_negatives

__all__ = ["run_text_retrieval", "Encoders", "evaluate_test"]

HEADLINE = ("ndcg@10", "mrr@10", "recall@100")


# -- set-up ------------------------------------------------------------------------------


# -- evaluation helpers ----------------------------------------------------------------------

class Encoders:
    """Query / document encoding with the run's precision and lengths."""

    def __init__(self, towers: Dict[str, TextEncoder], cfg: RunConfig, precision: str) -> None:
        self.towers, self.cfg, self.precision = towers, cfg, precision

    def queries(self, texts: Sequence[str], progress: Optional[str] = None) -> Tensor:
        return self.towers["query"].encode(list(texts), batch_size=self.cfg.train.encode_batch_size,
                                           precision=self.precision, max_length=self.cfg.model.query_max_length,
                                           progress=progress)

    def documents(self, texts: Sequence[str], progress: Optional[str] = None,
                  max_length: Optional[int] = None) -> Tensor:
        """Document embeddings, cut at ``max_length`` tokens (default ``model.document_max_length``)."""
        return self.towers["document"].encode(list(texts), batch_size=self.cfg.train.encode_batch_size,
                                              precision=self.precision,
                                              max_length=max_length or self.cfg.model.document_max_length,
                                              progress=progress)


def _dev_corpus(task: RetrievalTask, corpus_emb: Tensor, query_emb: Dict[str, Tensor], size: int,
                seed: int) -> List[int]:
    """Corpus rows of the dev evaluation: the dev positives, the base model's top
    candidates of each dev query (hard distractors), then random documents, up to ``size``."""
    index = task.corpus_index()
    rows: List[int] = []
    seen = set()

    def add(j: int) -> None:
        if j not in seen:
            seen.add(j)
            rows.append(j)

    for docs in task.dev_qrels.values():
        for d in docs:
            add(index[d])
    if task.dev_qrels:
        q = torch.stack([query_emb[qid] for qid in task.dev_qrels])
        per_query = max(1, (size - len(rows)) // (2 * len(task.dev_qrels)))
        top = (q @ corpus_emb.T).topk(min(per_query, corpus_emb.shape[0]), dim=1).indices
        for row in top.tolist():
            for j in row:
                add(j)
    rng = random.Random(seed)
    pool = [j for j in range(len(task.corpus_ids)) if j not in seen]
    rng.shuffle(pool)
    for j in pool[:max(0, size - len(rows))]:
        add(j)
    return sorted(rows)


def _after_brought(example: Example, mined: Example, pool: int) -> Example:
    """``example``'s own negatives, then ``mined``'s that are not among them, ``pool`` in all."""
    own_ids = list(example.negative_ids) + [None] * (len(example.negatives) - len(example.negative_ids))
    taken = {d for d in own_ids if d is not None} | {example.positive_id}
    extra = [(t, d) for t, d in zip(mined.negatives, mined.negative_ids) if d not in taken]
    extra = extra[:max(0, pool - len(example.negatives))]
    return dataclasses.replace(example, negatives=example.negatives + tuple(t for t, _ in extra),
                               negative_ids=tuple(own_ids) + tuple(d for _, d in extra))


def _in_memory_sampler(cfg: RunConfig, examples: Sequence[Example], query_emb: Dict[str, Tensor]):
    """``batching.sampler``'s batch sampler over the held examples (B3's teacher: the base
    model's query embeddings)."""
    bs, seed, h = cfg.batching.batch_size, cfg.train.seed, cfg.negatives.num_negatives
    if cfg.batching.sampler == "no_duplicates":
        return NoDuplicatesBatchSampler(examples, bs, seed=seed, drop_last=True, num_negatives=h or None)
    if cfg.batching.sampler == "b3":
        teacher = torch.stack([query_emb[e.query_id] for e in examples])
        return B3BatchSampler(examples, bs, query_embeddings=teacher, seed=seed)
    return RandomBatchSampler(len(examples), bs, seed=seed)


def _mine(cfg: RunConfig, need: Sequence[Example], task: RetrievalTask, query_emb: Dict[str, Tensor],
          corpus_emb: Tensor, pool: int, known: Dict[str, Set[str]]):
    """Hard negatives for ``need`` by ``negatives``'s settings, excluding each query's known
    positives: those of ``need`` and ``known`` (query id -> document ids: the qrels' and every
    training record's, short of negatives or not)."""
    index = task.corpus_index()
    positives = [row + sorted({index[d] for d in known.get(e.query_id, ()) if d in index} - set(row))
                 for e, row in zip(need, known_positives(need, corpus_ids=task.corpus_ids))]
    q = torch.stack([query_emb[e.query_id] for e in need])
    return mine_hard_negatives(q, corpus_emb, positives, num_negatives=pool,
                               rank_window=tuple(cfg.negatives.rank_window), sampling=cfg.negatives.sampling,
                               relative_margin=cfg.negatives.relative_margin,
                               absolute_margin=cfg.negatives.absolute_margin, seed=cfg.train.seed)


def _streamed_batches(task: RetrievalTask, cfg: RunConfig, pool: int,
                      mined_for: Dict[tuple, Example]) -> ShuffleBufferBatches:
    """data.stream: the training records read again each epoch through a shuffle buffer. A
    record short of ``pool`` negatives takes, after its own, the mined ones of its (query,
    document) in ``mined_for`` (beside a BEIR folder), then random documents (never a dev or
    test query's: only the documents that are no held-out query's), seeded per record."""
    h = cfg.negatives.num_negatives
    held = {d for qrels in (task.dev_qrels, task.test_qrels) for docs in qrels.values() for d in docs}
    rows = [j for j, d in enumerate(task.corpus_ids) if d not in held]
    ids, texts = [task.corpus_ids[j] for j in rows], [task.corpus_texts[j] for j in rows]
    short = task.train_min_negatives is None or task.train_min_negatives < pool
    if h and short and not ids:
        raise ConfigError(f"negatives.num_negatives: some records bring fewer than {pool} negatives and get random "
                          "ones from the sampled documents, and data.stream_distractors is 0 (raise it, or set "
                          "num_negatives to 0)")
    seed = cfg.train.seed

    def records():
        for ex in task.train_stream():
            mined = mined_for.get((ex.query_id, ex.positive_id)) if len(ex.negatives) < pool else None
            if mined is not None:
                ex = _after_brought(ex, mined, pool)
            if len(ex.negatives) != pool:
                [ex] = fill_negatives([ex], pool, ids, texts, {}, seed=f"{seed}:{ex.query_id}:{ex.positive_id}")
            yield ex

    source = Path(cfg.data.train_file or cfg.data.source)
    source = corpus_file(source) if source.is_dir() else source
    return ShuffleBufferBatches(records, cfg.batching.batch_size, num_records=task.train_count, seed=seed,
                                buffer_size=cfg.data.shuffle_buffer,
                                no_duplicates=cfg.batching.sampler == "no_duplicates", num_negatives=h or None,
                                fingerprint=f"{source.name}:{source.stat().st_size}:{task.train_count}")


def _metrics(scores) -> Dict[str, float]:
    return {k: float(v) for k, v in scores.to_dict().items()}


# -- the job ---------------------------------------------------------------------------------

def _corpus_key(cfg: RunConfig, device: torch.device, precision: str, task: RetrievalTask) -> tuple:
    """What the base model's corpus embeddings depend on (the key of ``embedding_cache``);
    the corpus texts, hashed, carry the document prefix."""
    import hashlib

    h = hashlib.sha1()
    for d, t in zip(task.corpus_ids, task.corpus_texts):
        h.update(f"{d}\x00{t}\x01".encode("utf-8", "surrogatepass"))
    m = cfg.model
    return (m.name, m.pooling, m.normalize, m.document_max_length, m.trust_remote_code, str(device), precision,
            cfg.train.encode_batch_size, h.hexdigest())


def run_text_retrieval(cfg: RunConfig, run: RunFolder, *, echo: Callable[[str], None] = print,
                       embedding_cache: Optional[Dict[tuple, Tensor]] = None) -> Dict[str, Any]:
    """Run the main job (see the module doc); returns the ``metrics.json`` summary.

    ``embedding_cache``: a dict shared by several runs in one process (``contrastkit bench
    dev``): the base model's corpus embeddings are looked up there under a key of everything
    they depend on (model, pooling, normalisation, length, device, precision, corpus texts) and
    stored after the first encode, so a sweep encodes the corpus once."""
    rank, world, device, say, precision = start_run(cfg, echo)
    main = rank == 0
    why = ("AMX / AVX512-BF16 CPU" if device.type == "cpu" and cpu_has_fast_bf16() else device.type) \
        if precision == "bf16" else ("asked" if cfg.train.precision == "fp32" else "no fast bfloat16 on this device")
    say(f"device {device}, precision {precision} ({why}); {world} process(es)")
    timer = PhaseTimer(on_phase=lambda name, s: run.log({"phase": "timing", "name": name, "seconds": round(s, 3)}))
    if main:
        dump_config(cfg, run.file("config.yaml"))
    ks = tuple(cfg.evaluation.ks)
    summary: Dict[str, Any] = {"recipe": cfg.recipe, "model": cfg.model.name, "data": cfg.data.source,
                               "device": str(device), "precision": precision, "world_size": world}

    # 1. load --------------------------------------------------------------------------------
    with timer("load"):
        task = build_retrieval_task(cfg.data, seed=cfg.train.seed)
        if task.unsupervised or task.train_stream is not None:
            # b3 partitions the held training examples; the guide needs the training queries'
            # base-model embeddings, which only a BEIR folder's train qrels give (data.train_file)
            which = "the crops of data.format: corpus" if task.unsupervised else "streamed training records " \
                "(data.stream)"
            if cfg.batching.sampler == "b3":
                why = "are not encoded" if task.unsupervised else "are not held"
                raise ConfigError(f"batching.sampler: b3 groups training queries by their base-model embeddings; "
                                  f"{which} {why} (use no_duplicates or random)")
            if cfg.negatives.guide_mask and (task.unsupervised or not task.train_qrels):
                raise ConfigError(f"negatives.guide_mask: the GISTEmbed guide scores training queries with the base "
                                  f"model; {which} are not encoded, so it would mask nothing (set it to false)")
        say(task.description)
        for note in task.notes:
            say(f"note: {note}")
        query_tower = TextEncoder(cfg.model.name, pooling=cfg.model.pooling, normalize=cfg.model.normalize,
                                  max_length=cfg.model.document_max_length,
                                  trust_remote_code=cfg.model.trust_remote_code).to(device)
        doc_tower = copy.deepcopy(query_tower) if cfg.model.separate_towers else query_tower
        towers = {"query": query_tower, "document": doc_tower}
        encoders = Encoders(towers, cfg, precision)
        sts = load_sts("test") if cfg.data.sts else None
    summary["task"] = task.description
    summary["notes"] = task.notes
    objective = build_objective(cfg).to(device)
    with_ids = task.train_stream is not None or all(e.query_id is not None for e in task.train_examples)
    check_objective_fits(cfg, objective, num_negatives=cfg.negatives.num_negatives,
                         masks_possible=cfg.negatives.guide_mask or (cfg.negatives.mask_duplicates and with_ids))

    # 2-3. encode once, evaluate the base model --------------------------------------------------
    needed_q = sorted(set(task.train_qrels) | set(task.dev_qrels) | set(task.test_qrels)
                      | {e.query_id for e in task.train_examples if e.query_id in task.queries})
    corpus_emb = query_emb_rows = before_scores = None
    query_emb: Dict[str, Tensor] = {}
    # the base corpus embeddings serve evaluation, mining and the guide; a corpus alone (crops,
    # no qrels) needs none of them, and its corpus may be the whole of a large file
    corpus_needed = bool(task.dev_qrels or task.test_qrels) or not (task.unsupervised or task.train_stream is not None)
    if main:
        with timer("encode_corpus"):
            key = _corpus_key(cfg, device, precision, task) if embedding_cache is not None else None
            if not corpus_needed:
                say("corpus not encoded: a corpus alone has nothing to evaluate or mine with it")
            elif key is not None and key in embedding_cache:
                corpus_emb = embedding_cache[key]
                say("corpus embeddings of the base model: reused from this process's cache")
            else:
                corpus_emb = encoders.documents(task.corpus_texts, progress="encode corpus (base)")
                if key is not None:
                    embedding_cache[key] = corpus_emb
        with timer("before"):
            q_rows = encoders.queries([task.queries[q] for q in needed_q], progress="encode queries (base)")
            query_emb = {q: q_rows[i] for i, q in enumerate(needed_q)}
            query_emb_rows = q_rows
            if task.test_qrels:
                before = before_scores = evaluate_test(task, encoders, corpus_emb, ks)
                summary["before"] = _metrics(before)
                run.log({"phase": "before", "split": "test", **summary["before"]})
                say("before (test): " + "  ".join(f"{m} {summary['before'][m]:.4f}" for m in HEADLINE))
            if sts is not None:
                summary["sts"] = {"split": "test", "before": evaluate_sts(
                    lambda t: encoders.queries(t, progress="encode STS-B test (base)"), sts)}
                say(f"before (STS-B test): spearman {summary['sts']['before']['spearman']:.4f}")
    if world > 1:  # every process builds the same false-negative guide
        corpus_emb, query_emb_rows = broadcast((corpus_emb, query_emb_rows), rank, world)
    dev_rows = _dev_corpus(task, corpus_emb, query_emb, cfg.train.dev_corpus_size, cfg.train.seed) \
        if main and task.dev_qrels else []
    dev_ids = [task.corpus_ids[j] for j in dev_rows]
    dev_texts = {d: task.corpus_texts[j] for d, j in zip(dev_ids, dev_rows)}
    dev_queries = {q: task.queries[q] for q in task.dev_qrels}

    # the dev documents are cut at the training length by default: the checkpoint and WiSE-FT
    # choices compare models with one consistent measure at half the cost of 256 tokens
    train_doc_len = cfg.model.train_document_max_length or cfg.model.document_max_length
    dev_doc_len = cfg.train.dev_document_max_length or train_doc_len

    def dev_eval(corpus_rows: Optional[Tensor] = None) -> Dict[str, float]:
        emb = corpus_rows if corpus_rows is not None else \
            encoders.documents([dev_texts[d] for d in dev_ids], max_length=dev_doc_len)
        scores = evaluate_retrieval(lambda t: encoders.queries(t), None, dev_queries, dev_texts, task.dev_qrels,
                                    ks=ks, corpus_embeddings=emb, corpus_ids=dev_ids)
        return _metrics(scores)

    select = cfg.evaluation.select_metric
    if main and dev_queries:
        reuse = corpus_emb[dev_rows] if dev_doc_len == cfg.model.document_max_length else None
        summary["dev"] = {"before": dev_eval(reuse), "corpus_size": len(dev_ids), "queries": len(dev_queries),
                          "document_max_length": dev_doc_len}
        run.log({"phase": "dev", "step": 0, "epoch": 0, **summary["dev"]["before"]})
        say(f"dev ({len(dev_queries)} queries x {len(dev_ids)} documents at {dev_doc_len} tokens), base: {select} "
            f"{summary['dev']['before'][select]:.4f}")

    # 4. mine ---------------------------------------------------------------------------------------
    examples = list(task.train_examples)
    known_ids = {q: {d for d, s in docs.items() if s > 0} for q, docs in {**task.train_qrels, **task.dev_qrels}.items()}
    h = cfg.negatives.num_negatives
    pool = h * cfg.negatives.pool_size  # negatives held per example: pool_size sets, one per epoch in turn
    mined_for: Dict[tuple, Example] = {}  # data.stream beside a BEIR folder: (query id, document id) -> mined
    with timer("mine"):
        if main and task.train_stream is not None:
            may_be_short = task.train_min_negatives is None or task.train_min_negatives < pool
            if h > 0 and cfg.negatives.mine and task.train_qrels and may_be_short:
                # beside a BEIR folder the train queries and the corpus are encoded: mine for each
                # (query, relevant document) of the train qrels and each (query, document) of a
                # record outside them; a streamed record short of negatives takes those of its
                # pair, after its own
                listed = {(q, d) for q, docs in task.train_qrels.items() for d, score in docs.items() if score > 0}
                pairs = [Example(query=task.queries[q], positive="", query_id=q, positive_id=d)
                         for q, d in sorted(listed | set(task.train_pairs_off_qrels))]
                mined = _mine(cfg, pairs, task, query_emb, corpus_emb, pool, known_ids)
                say(mined.summary())
                summary["mining"] = mined.stats
                mined_for = {(e.query_id, e.positive_id): m
                             for e, m in zip(pairs, mined.to_examples(pairs, task.corpus_texts, task.corpus_ids))}
                say(f"data.stream: a record with fewer than {pool} negatives gets its (query, document)'s mined ones "
                    "after its own")
            elif h > 0 and may_be_short:
                source = "corpus's" if task.train_qrels else "sampled"
                why = "negatives.mine is false" if task.train_qrels else "the training queries are not encoded"
                say(f"note: data.stream: no mining ({why}); each record keeps its own negatives, and a record with "
                    f"fewer than {pool} gets random ones from the {len(task.corpus_ids)} {source} documents (no dev "
                    "or test query's)")
        elif main:
            # negatives the training file brings are the user's: kept, first; mining only fills the rest
            brought = sum(1 for e in examples if e.negatives)
            short = [i for i, e in enumerate(examples) if len(e.negatives) < pool]
            if brought and h > 0:
                say(f"{brought} of {len(examples)} training examples bring their own negatives: kept (up to {pool} "
                    f"each); " + (f"{len(short)} short of {pool} get " + ("mined" if cfg.negatives.mine else "random")
                                  + " ones after them" if short else "nothing is mined"))
                summary["negatives_brought"] = {"examples": brought, "short": len(short)}
            have_ids = all(examples[i].query_id in query_emb and examples[i].positive_id is not None for i in short)
            if cfg.negatives.mine and h > 0 and have_ids and short:
                need = [examples[i] for i in short]
                known = {q: set(docs) for q, docs in known_ids.items()}
                for e in examples:  # a record's positive is known for its query, short of negatives or not
                    known.setdefault(e.query_id, set()).add(e.positive_id)
                mined = _mine(cfg, need, task, query_emb, corpus_emb, pool, known)
                say(mined.summary())
                summary["mining"] = mined.stats
                for i, m in zip(short, mined.to_examples(need, task.corpus_texts, task.corpus_ids)):
                    examples[i] = _after_brought(examples[i], m, pool)
            elif cfg.negatives.mine and h > 0 and short:
                why = "the crops of data.format: corpus are not encoded" if task.unsupervised else \
                    "the training pairs have no query / document ids in the corpus"
                say(f"note: mining skipped ({why}); negatives are drawn at random")
            if brought and h == 0:
                say(f"note: negatives.num_negatives is 0: the negatives {brought} training examples bring are not "
                    "used (in-batch negatives only)")
            # every example gets exactly `pool` negatives (0: none), the objective's column count
            examples = fill_negatives(examples, pool, task.corpus_ids, task.corpus_texts, known_ids,
                                      seed=cfg.train.seed)
        examples = broadcast(examples, rank, world)
        mined_for = broadcast(mined_for, rank, world) if task.train_stream is not None else {}

    # 5. train --------------------------------------------------------------------------------------
    loss_module = column_loss(objective, world)
    guide = None
    if cfg.negatives.guide_mask and corpus_emb is not None:
        guide = Guide(query_index={q: i for i, q in enumerate(needed_q)}, query_embeddings=query_emb_rows,
                      doc_index=task.corpus_index(), doc_embeddings=corpus_emb, margin=cfg.negatives.guide_margin)
    chunk_tokens = None
    if cfg.batching.chunk_memory_gb is not None:
        from ..scale.memory import chunk_tokens_for_budget

        plan = chunk_tokens_for_budget(doc_tower, cfg.batching.chunk_memory_gb * 2**30, train_doc_len,
                                       groups=2 + h,
                                       autocast_dtype=autocast_dtype(precision))
        chunk_tokens = int(plan["chunk_tokens"])
        summary["chunking"] = {"chunk_memory_gb": cfg.batching.chunk_memory_gb, **plan}
        say(f"chunks of up to {chunk_tokens} padded tokens per encoder pass ({plan['rows_at_max_length']} rows of "
            f"{train_doc_len}): {plan['per_token'] / 2**10:.0f} KiB of saved activations per token"
            + (f" and {plan['per_pass'] / 2**20:.0f} MiB per pass" if plan["per_pass"] else "")
            + f", measured; {cfg.batching.chunk_memory_gb:g} GB over {2 + h} input groups"
            + ("" if plan["fits"] else " (less than one row per group fits: one row each)"))
    step_fn = RetrievalStep(query_encoder=query_tower, doc_encoder=doc_tower if cfg.model.separate_towers else None,
                            objective=loss_module, query_max_length=cfg.model.query_max_length,
                            doc_max_length=train_doc_len, chunk_size=cfg.batching.chunk_size,
                            autocast_dtype=autocast_dtype(precision), sort_by_length=cfg.batching.sort_by_length,
                            known_positives=known_ids, mask_duplicates=cfg.negatives.mask_duplicates, guide=guide,
                            rank=rank, world=world, memory_steps=cfg.negatives.memory_steps,
                            chunk_tokens=chunk_tokens)
    if cfg.batching.batch_size % world:
        raise ConfigError(f"batching.batch_size: {cfg.batching.batch_size} must be a multiple of the {world} processes")
    n_train = task.num_train_examples
    if n_train < cfg.batching.batch_size:
        raise ConfigError(f"batching.batch_size: {cfg.batching.batch_size} is larger than the {n_train} "
                          "training examples")
    if task.train_stream is not None:
        batches = _streamed_batches(task, cfg, pool, mined_for)
    else:
        if cfg.batching.sampler == "b3" and corpus_emb is None and world > 1:
            raise ConfigError("batching.sampler: b3 is not available with several processes yet")
        batches = ExampleBatches(_in_memory_sampler(cfg, examples, query_emb), examples, num_negatives=h or None)
    steps_per_epoch = max(1, len(batches))
    total = cfg.optim.max_steps or max(1, math.ceil(cfg.optim.epochs * steps_per_epoch))
    trainable = {"query": query_tower}
    if cfg.model.separate_towers:
        trainable["document"] = doc_tower
    if any(p.requires_grad for p in objective.parameters()):
        trainable["objective"] = objective
    optimizer = build_optimizer(trainable, cfg)
    schedule = build_schedule(optimizer, kind=cfg.optim.schedule, total_steps=total,
                              warmup_steps=int(cfg.optim.warmup_ratio * total))
    base_states = {k: snapshot(t.model) for k, t in towers.items()} if cfg.interpolation.enabled else {}

    def evaluate(step: int) -> Dict[str, float]:
        return broadcast(dev_eval() if main else None, rank, world)

    def save_best(folder: Path) -> None:
        atomic_replace_dir(lambda tmp: save_towers(towers, tmp, cfg.model.separate_towers), folder)

    chunks = f"chunks of up to {chunk_tokens} tokens" if chunk_tokens else f"chunks of {cfg.batching.chunk_size}"
    say(f"training: {n_train} examples, batch {cfg.batching.batch_size} ({chunks}), "
        f"{h} hard negative(s) each"
        + (f" (set e mod {cfg.negatives.pool_size} of the mined pool in epoch e)" if h and cfg.negatives.pool_size > 1
           else "")
        + f", {total} steps ({steps_per_epoch} per epoch), objective {cfg.objective.name} "
        f"at temperature {cfg.objective.temperature}, training documents cut at {train_doc_len} tokens")
    trainer = Trainer(modules=trainable, step_fn=step_fn, batches=batches, optimizer=optimizer, scheduler=schedule,
                      total_steps=total, evaluate=evaluate if dev_queries or not main else None,
                      select_metric=select, save_best=save_best, eval_every=cfg.train.eval_every,
                      checkpoint_every=cfg.train.checkpoint_every, max_grad_norm=cfg.optim.max_grad_norm,
                      ema_decay=cfg.optim.ema_decay, run=run, progress=main,
                      examples_per_step=cfg.batching.batch_size)
    with timer("train"):
        result = trainer.fit(resume=cfg.output.resume)
    train_losses = [r["loss"] for r in run.records() if r.get("phase") == "train"] if main else []
    summary["train"] = {"steps": result.steps, "examples": n_train, "batch_size": cfg.batching.batch_size,
                        "epochs": cfg.optim.epochs, "steps_per_epoch": steps_per_epoch,
                        "loss_first": train_losses[0] if train_losses else None,
                        "loss_last": train_losses[-1] if train_losses else None, **result.stats}
    skipped = result.stats.get("empty_rows_skipped", 0)
    if skipped:
        say(f"note: {skipped} anchor row(s) over the run had no negative left after the false-negative masks "
            f"and were left out of their batch's loss (per step in metrics.jsonl, empty_rows_skipped)")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if not main:
        return summary

    # 6. interpolate (WiSE-FT) --------------------------------------------------------------------------
    with timer("interpolate"):
        if "dev" in summary:
            warning = best_then_interpolate(
                towers=towers, base_states=base_states if cfg.interpolation.enabled else None, result=result,
                run=run, dev=summary["dev"], select=select, alphas=cfg.interpolation.alphas,
                tolerance=cfg.interpolation.tolerance, stop_early=cfg.interpolation.stop_early, evaluate=dev_eval,
                separate=cfg.model.separate_towers, say=say)
            if warning:
                summary.setdefault("warnings", []).append(warning)
        atomic_replace_dir(lambda tmp: save_towers(towers, tmp, cfg.model.separate_towers), run.file("model"))

    # 7. after -------------------------------------------------------------------------------------------
    with timer("after"):
        if task.test_qrels:
            corpus_after = encoders.documents(task.corpus_texts, progress="encode corpus (final)")
            after = evaluate_test(task, encoders, corpus_after, ks)
            summary["after"] = _metrics(after)
            run.log({"phase": "after", "split": "test", **summary["after"]})
            if list(after.query_ids) != list(before_scores.query_ids):
                raise RuntimeError("before and after scored different test queries; the paired bootstrap needs one set")
            summary["difference"] = {}
            for m in HEADLINE:
                if m in after.per_query:
                    summary["difference"][m] = paired_bootstrap(before_scores.per_query[m], after.per_query[m],
                                                                n_resamples=cfg.evaluation.bootstrap_resamples,
                                                                seed=cfg.train.seed)
            run.write_json("per_query.json", {"metric": "ndcg@10", "query_ids": list(after.query_ids),
                                              "before": before_scores.per_query["ndcg@10"].tolist(),
                                              "after": after.per_query["ndcg@10"].tolist()})
        if sts is not None:
            summary["sts"]["after"] = evaluate_sts(lambda t: encoders.queries(t, progress="encode STS-B test (final)"),
                                                   sts)
    summary["phases"] = dict(timer.seconds)
    summary["wall_seconds"] = round(timer.total(), 2)
    summary["test_split"] = None if not task.test_qrels else \
        cfg.data.test_split if not task.test_is_held_out_from_train_file else "held-out share"
    summary["versions"] = versions()
    run.write_json("metrics.json", summary)
    return summary


def evaluate_test(task: RetrievalTask, encoders: Encoders, corpus_emb: Tensor, ks):
    """Test metrics of the current query tower against ``corpus_emb`` (whole corpus)."""
    queries = {q: task.queries[q] for q in task.test_qrels}
    return evaluate_retrieval(lambda t: encoders.queries(t), None, queries,
                              dict(zip(task.corpus_ids, task.corpus_texts)), task.test_qrels, ks=ks,
                              corpus_embeddings=corpus_emb, corpus_ids=task.corpus_ids)


