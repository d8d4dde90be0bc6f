"""The main job side by side: ``contrastkit train`` vs sentence-transformers' documented recipe.

On the same SciFact train pairs, the same dev / test split, the same base model (the
bundled all-MiniLM-L6-v2), the same precision and the same number of steps:

``ours``
    ``contrastkit train`` with the default config (seeds 0, 1, 2 by default).
``peer``
    sentence-transformers' documented recipe: ``util.mine_hard_negatives`` (documented
    defaults: ``range_min=0``, ``range_max=None``, no margin, ``sampling_strategy="top"``;
    ``num_negatives`` from the config, 1) over the same corpus, on exactly the train pairs
    ours trains on (``build_retrieval_task(cfg.data, seed=k).train_examples``: the dev
    queries are held out as for ours), then ``SentenceTransformerTrainer`` with
    ``MultipleNegativesRankingLoss`` (scale ``1 / objective.temperature`` = 20),
    ``BatchSamplers.NO_DUPLICATES``, the same batch size, learning rate, warm-up steps,
    weight decay, schedule, gradient clipping, max sequence lengths, number of steps and
    precision (bf16 autocast where ours uses it, also around the mining encode). The model it
    saves is evaluated by the very functions ours uses (``contrastkit.evaluation.
    evaluate_retrieval`` on the test qrels over the whole corpus, ``evaluate_sts`` on STS-B
    test, same encoder settings), so the numbers are comparable.
``peer-documented``
    the same recipe at the learning rate sentence-transformers documents (2e-5, its training
    overview's ``SentenceTransformerTrainingArguments`` example; warm-up ratio 0.1 as ours),
    every other setting as ``peer``. ``peer`` gets ours' learning rate, which ours chose on
    the dev split (``contrastkit bench dev``); this row is the recipe as a user who follows
    its documentation runs it. Both rows are reported.
``peer-report`` (first seed only)
    the peer recipe producing what ours' report holds besides the after numbers, with
    sentence-transformers' own evaluators as its documented optional steps do: the base model
    on test and STS-B before training, a dev evaluator on the base model and at the end of each
    epoch (:func:`run_peer` ``evidence``). Same recipe and settings (the evaluator calls move
    the random stream, so its after numbers differ from the peer's by seed noise); it
    measures what the evidence costs the peer recipe, to compare with ours like for like.
the ablations of ours (first seed only; the table says so)
    ``mining-filter`` (``negatives.relative_margin=0.95``), ``guide-mask``
    (``negatives.guide_mask=true``), ``no-duplicate-mask`` (``negatives.mask_duplicates=false``),
    ``three-epochs`` (``optim.epochs=3``), ``no-interpolation``
    (``interpolation.enabled=false``), ``batch-128`` (``batching.batch_size=128``),
    ``no-negatives`` (``negatives.num_negatives=0``).

Each configuration and seed runs in its own subprocess and leaves ``<results>/<name>/
seed<k>.json`` (the run folder or the peer's model next to it in ``<name>/seed<k>/``, the
process output in ``seed<k>.log``). A configuration whose result file exists is skipped,
so an interrupted benchmark continues where it stopped. The summary (test nDCG@10 mean,
min..max and std over seeds, STS-B Spearman, pipeline wall time, ratios to the peer) is
printed and written to ``<results>/summary.md`` with figures ``summary.png`` (quality) and
``summary_time.png`` (mean seconds per phase).

Wall time is the same for both sides: the in-process phase timer of the pipeline (load,
with the import of the modelling library, mining, training, evaluation; for ours also its
before-evaluation, dev evaluations and interpolation, which the peer recipe does not do),
not counting interpreter start-up; the whole subprocess is kept as ``process_seconds``.

    contrastkit bench train                                  # hours on 2 CPU cores; resumable
    contrastkit bench train --only ours peer --seeds 0
    contrastkit bench train --table-from results/bench_train  # the summary of what is there
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["CONFIGURATIONS", "Configuration", "add_arguments", "run", "run_peer", "load_results", "seed_stats", "summarize",
           "write_summary"]

HEADLINE = ("ndcg@10", "mrr@10", "recall@100")


@dataclass(frozen=True)
class Configuration:
    """One row of the benchmark: ``kind`` ``"ours"`` (``contrastkit train --set`` each of
    ``overrides``) or ``"peer"`` (:func:`run_peer`); ``all_seeds`` False: first seed only."""

    name: str
    kind: str
    overrides: Tuple[str, ...] = ()
    all_seeds: bool = True
    description: str = ""
    evidence: bool = False  # peer only: also produce ours' report (see run_peer's ``evidence``)


# the learning rate of sentence-transformers' training overview ("Training Arguments" and the
# "Trainer" example: SentenceTransformerTrainingArguments(..., learning_rate=2e-5, warmup_ratio=0.1))
DOCUMENTED_LR = 2e-5

CONFIGURATIONS: Dict[str, Configuration] = {c.name: c for c in (
    Configuration("ours", "ours", (), True, "contrastkit train, default config"),
    Configuration("peer", "peer", ("train.tune_malloc=false",), True,
                  "sentence-transformers: mine_hard_negatives + MNRL trainer"),
    Configuration("peer-documented", "peer", ("train.tune_malloc=false", f"optim.lr={DOCUMENTED_LR}"), True,
                  f"the peer recipe at sentence-transformers' documented learning rate ({DOCUMENTED_LR}), "
                  "not the one ours chose on dev"),
    Configuration("peer-report", "peer", ("train.tune_malloc=false",), False, "the peer recipe producing ours' "
                  "report: base model on test and STS-B before training, dev evaluator before and each epoch",
                  evidence=True),
    Configuration("peer-malloc", "peer", (), False, "the peer recipe in a process with ours' allocator setting "
                  "(train.tune_malloc)"),
    Configuration("no-malloc-tuning", "ours", ("train.tune_malloc=false",), False,
                  "ours, glibc allocator left at its defaults"),
    Configuration("mining-filter", "ours", ("negatives.relative_margin=0.95",), False,
                  "ours + NV-Retriever 95% relative-margin filter"),
    Configuration("guide-mask", "ours", ("negatives.guide_mask=true",), False, "ours + GISTEmbed guide mask"),
    Configuration("no-duplicate-mask", "ours", ("negatives.mask_duplicates=false",), False,
                  "ours, duplicate-positive mask off"),
    Configuration("three-epochs", "ours", ("optim.epochs=3",), False, "ours, 3 epochs instead of 2"),
    Configuration("no-interpolation", "ours", ("interpolation.enabled=false",), False, "ours, WiSE-FT off"),
    Configuration("batch-128", "ours", ("batching.batch_size=128",), False, "ours, cached batch 128"),
    Configuration("no-negatives", "ours", ("negatives.num_negatives=0",), False, "ours, no mined negatives"),
)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default="results/bench_train",
                   help="results folder (default results/bench_train); existing result files are kept and skipped")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds of ours and the peer (default 0 1 2); the ablations run the first one")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help=f"run these configurations only, of: {', '.join(CONFIGURATIONS)}")
    p.add_argument("--max-steps", type=int, default=None, help="optim.max_steps for every configuration (tiny runs)")
    p.add_argument("--data", default=None, help="data.source for every configuration (default: bundled scifact)")
    p.add_argument("--model", default=None, help="model.name for every configuration (default: all-MiniLM-L6-v2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="a config override for every configuration, ours and the peer (repeatable)")
    p.add_argument("--table-from", default=None, metavar="DIR",
                   help="print (and rewrite summary.md / summary.png of) the results in DIR; run nothing")
    p.add_argument("--peer-worker", default=None, help=argparse.SUPPRESS)


# -- the peer: sentence-transformers' documented recipe (runs in its own process) ------------

def _seed_everything(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _ours_step_count(cfg, task) -> int:
    """The number of steps ``contrastkit train`` takes for ``cfg`` when no run of ours gives
    it: ``optim.max_steps``, else ``ceil(epochs x batches per epoch)`` of its no-duplicates
    sampler (drop_last) over the train pairs (before mining; the mined negatives can only
    lower it by a batch or so)."""
    if cfg.optim.max_steps:
        return int(cfg.optim.max_steps)
    from ..negatives.samplers import NoDuplicatesBatchSampler

    per_epoch = len(NoDuplicatesBatchSampler(task.train_examples, cfg.batching.batch_size, seed=cfg.train.seed,
                                             drop_last=True))
    return max(1, math.ceil(cfg.optim.epochs * max(1, per_epoch)))


def _st_model(cfg, device: str):
    """The base model as a SentenceTransformer with the pooling ours uses."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    from ..models.text import read_sentence_transformers_config, resolve_model_path

    path = resolve_model_path(cfg.model.name)
    folder = read_sentence_transformers_config(path) if os.path.isdir(path) else {}
    pooling = cfg.model.pooling or str(folder.get("pooling", "mean"))
    mode = {"mean": "mean", "cls": "cls", "last": "lasttoken"}[pooling]
    remote = {"trust_remote_code": cfg.model.trust_remote_code}
    word = Transformer(path, max_seq_length=cfg.model.document_max_length, model_kwargs=remote,
                       config_kwargs=remote, processor_kwargs=remote)
    modules = [word, Pooling(word.get_embedding_dimension(), pooling_mode=mode)]
    if cfg.model.normalize:
        modules.append(Normalize())
    return SentenceTransformer(modules=modules, device=device)


def _ir_inputs(task, qrels) -> Tuple[Dict[str, str], Dict[str, set]]:
    """(query id -> text, query id -> relevant document ids) of ``qrels`` (the task's qrels
    hold relevant judgements only), as sentence-transformers' ``InformationRetrievalEvaluator``
    takes them."""
    return {q: task.queries[q] for q in qrels}, {q: set(docs) for q, docs in qrels.items()}


def _st_before(cfg, task, model, sts, precision: str, device: str) -> Dict[str, Any]:
    """The base model on the test qrels (whole corpus) and STS-B test, by sentence-transformers'
    evaluators, as a user of that library produces a before number."""
    from sentence_transformers.sentence_transformer.evaluation import (EmbeddingSimilarityEvaluator,
                                                                       InformationRetrievalEvaluator)

    from ..models.precision import autocast

    out: Dict[str, Any] = {}
    model.max_seq_length = cfg.model.document_max_length
    bs = cfg.train.encode_batch_size
    with autocast(precision, device):
        if task.test_qrels:
            queries, relevant = _ir_inputs(task, task.test_qrels)
            ir = InformationRetrievalEvaluator(queries, dict(zip(task.corpus_ids, task.corpus_texts)), relevant,
                                               batch_size=bs, name="test", write_csv=False)
            out["test"] = ir(model)
        if sts is not None:
            ev = EmbeddingSimilarityEvaluator(sts.sentences1, sts.sentences2, sts.scores, batch_size=bs,
                                              name="sts-test", write_csv=False)
            out["sts"] = ev(model)
    return out


def _st_dev_evaluator(cfg, task, seed: int, precision: str, device: str):
    """sentence-transformers' ``InformationRetrievalEvaluator`` on ours' dev queries: their
    positives plus seeded random documents up to ``train.dev_corpus_size``; it runs under
    the run's autocast (the trainer calls evaluators without one), as ours' dev evaluation does."""
    import random

    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    from ..models.precision import autocast

    class AutocastEvaluator(InformationRetrievalEvaluator):
        def __call__(self, *args, **kwargs):
            with autocast(precision, device):
                return super().__call__(*args, **kwargs)

    queries, relevant = _ir_inputs(task, task.dev_qrels)
    keep = {d for docs in relevant.values() for d in docs}
    others = [d for d in task.corpus_ids if d not in keep]
    random.Random(seed).shuffle(others)
    keep |= set(others[:max(0, cfg.train.dev_corpus_size - len(keep))])
    text = dict(zip(task.corpus_ids, task.corpus_texts))
    return AutocastEvaluator(queries, {d: text[d] for d in sorted(keep)},
                             relevant, batch_size=cfg.train.encode_batch_size, name="dev", write_csv=False)


def run_peer(overrides: Sequence[str], output: str, *, steps: Optional[int] = None,
             evidence: bool = False) -> Dict[str, Any]:
    """Fine-tune with sentence-transformers' documented recipe on the task of ``load_config(
    overrides=overrides)`` and evaluate with contrastkit's evaluation; returns the result record.

    The recipe (sentence-transformers training overview, "Training with hard negatives"):
    ``mine_hard_negatives(dataset, model, corpus=..., num_negatives=h)`` with its documented
    defaults for the rank range and margins, then ``SentenceTransformerTrainer`` with
    ``MultipleNegativesRankingLoss(model, scale=1 / temperature)`` and
    ``batch_sampler=NO_DUPLICATES``. Everything that ours also has comes from the same
    config: batch size, learning rate, weight decay, warm-up ``int(warmup_ratio x steps)``,
    schedule, gradient clipping, seed, precision (bf16 autocast: ``resolve_precision``),
    maximum lengths (training: ``max(query_max_length, train_document_max_length)``, one
    length for both columns as sentence-transformers has; mining: ``document_max_length``),
    and the process's host allocator (``train.tune_malloc``: the ``peer`` configuration sets
    it false, as the documented recipe runs on glibc's defaults; ``peer-malloc`` keeps ours').
    ``steps`` (default: what ours takes, :func:`_ours_step_count`) is the number of
    optimiser steps. Evaluation is ``contrastkit.recipes.text_retrieval``'s own: test
    nDCG@10 / MRR@10 / Recall@100 over the whole corpus, STS-B test Spearman.

    ``evidence``: the recipe also produces what ours' report holds besides the after numbers,
    with sentence-transformers' own evaluators, as its documented optional steps do ("Create
    an evaluator & evaluate the base model", ``eval_strategy``): phase ``before``: the base
    model on the test qrels over the whole corpus (``InformationRetrievalEvaluator`` at
    ``document_max_length``) and on STS-B test (``EmbeddingSimilarityEvaluator``); during
    ``train``: a dev ``InformationRetrievalEvaluator`` (ours' dev queries; their positives
    plus random documents up to ``train.dev_corpus_size``, at the training length) on the
    base model and at the end of each epoch. The recipe and its settings are unchanged (the
    evaluator calls move the random stream, so the weights are not bit-identical to the plain
    peer's); what it adds is the time of that evidence, to compare with ours' like for like.

    Example::

        # not run: fine-tunes all-MiniLM-L6-v2 for minutes (then encodes the whole corpus)
        from contrastkit.bench.train import run_peer
        rec = run_peer(["data.source=scifact", "train.seed=0"], "results/bench_train/peer/seed0")
        rec["after"]["ndcg@10"], rec["wall_seconds"]
    """
    import logging

    from ..data import load_sts
    from ..evaluation import evaluate_sts
    from ..models import TextEncoder
    from ..models.precision import autocast, resolve_device, resolve_precision
    from ..recipes.retrieval_task import build_retrieval_task
    from ..recipes.text_retrieval import Encoders, evaluate_test
    from ..training.allocator import tune_malloc_for
    from ..training.config import load_config
    from ..training.timing import PhaseTimer

    cfg = load_config(overrides=list(overrides))
    seed = cfg.train.seed
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    tune_malloc_for(device, cfg.train.tune_malloc, say=lambda note: print(note, flush=True))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    timer = PhaseTimer()
    _seed_everything(seed)
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)

    with timer("load"):
        # the modelling libraries are imported in the load phase, as ours imports transformers there
        from datasets import Dataset
        from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
        from sentence_transformers.sentence_transformer.training_args import BatchSamplers
        from sentence_transformers.util import mine_hard_negatives

        task = build_retrieval_task(cfg.data, seed=seed)
        model = _st_model(cfg, device)
        sts = load_sts("test") if cfg.data.sts else None
        pairs = Dataset.from_dict({"anchor": [e.query for e in task.train_examples],
                                   "positive": [e.positive for e in task.train_examples]})
    total = int(steps) if steps else _ours_step_count(cfg, task)
    h = cfg.negatives.num_negatives
    evidence_record: Dict[str, Any] = {}
    train_len = max(cfg.model.query_max_length, cfg.model.train_document_max_length or cfg.model.document_max_length)
    dev_evaluator = None
    if evidence:
        with timer("before"):
            evidence_record["before"] = _st_before(cfg, task, model, sts, precision, device)
        dev_evaluator = _st_dev_evaluator(cfg, task, seed, precision, device)
        with timer("train"):  # the documented "evaluate the base model" on dev, at the training length
            model.max_seq_length = train_len
            evidence_record["dev_before"] = dev_evaluator(model)
    mining: Dict[str, Any] = {}
    with timer("mine"):
        train_set = pairs
        if cfg.negatives.mine and h > 0:
            model.max_seq_length = cfg.model.document_max_length
            with autocast(precision, device):
                train_set = mine_hard_negatives(pairs, model, corpus=list(task.corpus_texts), num_negatives=h,
                                                batch_size=cfg.train.encode_batch_size, verbose=True)
            mining = {"pairs": len(pairs), "rows": len(train_set), "num_negatives": h,
                      "settings": "documented defaults: range_min=0, range_max=None, no margin, sampling top"}

    with timer("train"):
        model.max_seq_length = train_len
        loss = MultipleNegativesRankingLoss(model, scale=1.0 / cfg.objective.temperature)
        args = SentenceTransformerTrainingArguments(
            output_dir=str(out / "trainer"), max_steps=total, num_train_epochs=cfg.optim.epochs,
            per_device_train_batch_size=cfg.batching.batch_size, learning_rate=cfg.optim.lr,
            weight_decay=cfg.optim.weight_decay, warmup_steps=int(cfg.optim.warmup_ratio * total),
            lr_scheduler_type={"constant": "constant_with_warmup"}.get(cfg.optim.schedule, cfg.optim.schedule),
            max_grad_norm=cfg.optim.max_grad_norm or 0.0,
            bf16=precision == "bf16", batch_sampler=BatchSamplers.NO_DUPLICATES, seed=seed, data_seed=seed,
            dataloader_drop_last=True, save_strategy="no", eval_strategy="epoch" if evidence else "no",
            logging_steps=max(1, total // 10), report_to="none", disable_tqdm=True, use_cpu=device == "cpu")
        trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=train_set, loss=loss,
                                             evaluator=dev_evaluator)
        result = trainer.train()
        if int(result.global_step) != total:
            raise RuntimeError(
                f"the peer took {result.global_step} steps, not the {total} that ours takes: its "
                f"NoDuplicatesBatchSampler could not fill batches of {cfg.batching.batch_size} from "
                f"{len(train_set)} rows (too many repeated texts); lower batching.batch_size")
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        if evidence:
            evidence_record["dev"] = [{k: v for k, v in r.items() if k.endswith("ndcg@10") or k in ("epoch", "step")}
                                      for r in trainer.state.log_history if any(k.endswith("ndcg@10") for k in r)]
        model.save(str(out / "model"))

    with timer("after"):
        enc = TextEncoder(str(out / "model"), pooling=cfg.model.pooling, normalize=cfg.model.normalize,
                          max_length=cfg.model.document_max_length,
                          trust_remote_code=cfg.model.trust_remote_code).to(device)
        encoders = Encoders({"query": enc, "document": enc}, cfg, precision)
        ks = tuple(cfg.evaluation.ks)
        scores = None
        if task.test_qrels:
            corpus_emb = encoders.documents(task.corpus_texts)
            scores = evaluate_test(task, encoders, corpus_emb, ks)
        sts_after = evaluate_sts(lambda t: encoders.queries(t), sts) if sts is not None else None

    record: Dict[str, Any] = {
        "kind": "peer", "seed": seed, "device": str(device), "precision": precision,
        "wall_seconds": round(timer.total(), 2), "phases": dict(timer.seconds),
        "train": {"steps": int(result.global_step), "examples": len(train_set), "pairs": len(pairs),
                  "batch_size": cfg.batching.batch_size, "loss_first": losses[0] if losses else None,
                  "loss_last": losses[-1] if losses else None},
        "mining": mining, "task": task.description,
    }
    if evidence:
        record["evidence"] = evidence_record
    if scores is not None:
        record["after"] = {k: float(v) for k, v in scores.to_dict().items()}
        record["per_query"] = {"metric": "ndcg@10", "query_ids": list(scores.query_ids),
                               "after": scores.per_query["ndcg@10"].tolist()}
    if sts_after is not None:
        record["sts"] = {"split": "test", "after": sts_after}
    return record


# -- running the configurations ---------------------------------------------------------------

def _selected(only: Optional[Sequence[str]]) -> List[Configuration]:
    if not only:
        return list(CONFIGURATIONS.values())
    unknown = [n for n in only if n not in CONFIGURATIONS]
    if unknown:
        raise ValueError(f"--only: unknown configuration {unknown[0]!r}; allowed values: {', '.join(CONFIGURATIONS)}")
    return [CONFIGURATIONS[n] for n in CONFIGURATIONS if n in only]


def _common_overrides(args) -> List[str]:
    out = []
    if args.data is not None:
        out.append(f"data.source={args.data}")
    if args.model is not None:
        out.append(f"model.name={args.model}")
    if args.max_steps is not None:
        out.append(f"optim.max_steps={args.max_steps}")
    return out + list(args.overrides)


def _plan(configs: Sequence[Configuration], seeds: Sequence[int]) -> List[Tuple[Configuration, int]]:
    """(configuration, seed) in running order: seed by seed, so that a partial run already
    compares ours and the peer; the ablations right after the first seed's ours and peer."""
    plan = []
    for i, seed in enumerate(seeds):
        for c in configs:
            if c.all_seeds or i == 0:
                plan.append((c, seed))
    return plan


def _env() -> Dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")        # never reach a model hub: local / bundled models only
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("WANDB_DISABLED", "true")
    return env


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _ours_record(metrics: Dict[str, Any], seed: int, run_dir: Path) -> Dict[str, Any]:
    rec: Dict[str, Any] = {"kind": "ours", "seed": seed}
    pq = run_dir / "per_query.json"
    if pq.is_file():
        per_query = json.loads(pq.read_text(encoding="utf-8"))
        rec["per_query"] = {k: per_query[k] for k in ("metric", "query_ids", "after") if k in per_query}
    for key in ("before", "after", "difference", "sts", "phases", "wall_seconds", "train", "mining", "device",
                "precision", "task"):
        if key in metrics:
            rec[key] = metrics[key]
    if "dev" in metrics:
        rec["dev"] = {k: metrics["dev"][k] for k in ("best_step", "interpolation") if k in metrics["dev"]}
    return rec


def _overrides(c: Configuration, seed: int, common: Sequence[str]) -> List[str]:
    """The config overrides of one (configuration, seed): common ones, the configuration's, the seed."""
    return [*common, *c.overrides, f"train.seed={seed}"]


def _resolved(overrides: Sequence[str]) -> Dict[str, Any]:
    """The whole config of ``overrides`` (defaults included, output section aside): what a
    result was made with, so that a change of a default is caught like a change of --set."""
    from ..training.config import config_to_dict, load_config

    cfg = config_to_dict(load_config(overrides=list(overrides)))
    cfg.pop("output", None)
    return cfg


# config fields the peer recipe never reads (ours' dev evaluation, checkpoints and
# interpolation): a change to one of them leaves the peer's results valid
PEER_IGNORES = ("interpolation", "train.dev_document_max_length", "train.dev_corpus_size", "train.eval_every",
                "train.checkpoint_every", "evaluation.select_metric")


def _compared(config: Any, kind: str) -> Any:
    """The part of a resolved config that decides a result of this kind: all of it for
    ours, all but :data:`PEER_IGNORES` for the peer."""
    if kind != "peer" or not isinstance(config, dict):
        return config
    out = copy.deepcopy(config)
    for path in PEER_IGNORES:
        *parents, last = path.split(".")
        node = out
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return out


def _same_run(run_dir: Path, overrides: Sequence[str]) -> bool:
    """True when ``run_dir/config.yaml`` is the config of ``overrides`` (output section aside)."""
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(saved, dict):
        return False
    saved.pop("output", None)
    return saved == _resolved(overrides)


def _run_one(c: Configuration, seed: int, common: List[str], results: Path) -> Tuple[bool, str]:
    """Run one (configuration, seed) in a subprocess (its result file does not exist yet);
    (ran, message)."""
    folder = results / c.name
    folder.mkdir(parents=True, exist_ok=True)
    result_file = folder / f"seed{seed}.json"
    run_dir = folder / f"seed{seed}"
    overrides = _overrides(c, seed, common)
    if c.kind == "ours" and (run_dir / "metrics.json").is_file() and _same_run(run_dir, overrides):
        # the run finished but the benchmark stopped before writing its record
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        record = {**_ours_record(metrics, seed, run_dir), "name": c.name, "overrides": overrides,
                  "config": _resolved(overrides)}
        _atomic_write_json(result_file, record)
        return False, "result taken from its finished run folder"
    partial = folder / f"_seed{seed}.worker.json"   # the peer worker's record (not a result file yet)
    if c.kind == "peer" and partial.is_file():
        record = json.loads(partial.read_text(encoding="utf-8"))
        if record.get("overrides") == overrides:   # the worker finished but the benchmark stopped after it
            _atomic_write_json(result_file, {**record, "name": c.name, "config": _resolved(overrides)})
            partial.unlink()
            return False, "result taken from its finished worker"
    if c.kind == "ours":
        cmd = [sys.executable, "-m", "contrastkit", "train", "--output", str(run_dir), "--overwrite"]
        for o in overrides:
            cmd += ["--set", o]
    else:
        spec = {"overrides": overrides, "output": str(run_dir), "result": str(partial),
                "steps": _peer_steps(results, seed, overrides), "evidence": c.evidence}
        cmd = [sys.executable, "-m", "contrastkit.bench.train", "--peer-worker", json.dumps(spec)]
    log = folder / f"seed{seed}.log"
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=_env())
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        return True, f"FAILED (exit {proc.returncode}, see {log}): " + " | ".join(tail)
    if c.kind == "ours":
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
        record = _ours_record(metrics, seed, run_dir)
    else:
        record = json.loads(partial.read_text(encoding="utf-8"))
    record.update({"name": c.name, "overrides": overrides, "config": _resolved(overrides),
                   "process_seconds": round(seconds, 2)})
    _atomic_write_json(result_file, record)
    if c.kind == "peer":
        partial.unlink()
    return True, f"test ndcg@10 {record.get('after', {}).get('ndcg@10', float('nan')):.4f}, " \
                 f"pipeline {record.get('wall_seconds', 0):.0f} s"


def _peer_steps(results: Path, seed: int, overrides: Sequence[str]) -> Optional[int]:
    """The steps ours took at this seed (from its result file), so both take the same number;
    None when ours has not run (the peer then computes ours' count itself)."""
    if any(o.startswith("optim.max_steps=") for o in overrides):
        return None
    ours = results / "ours" / f"seed{seed}.json"
    if ours.is_file():
        steps = json.loads(ours.read_text(encoding="utf-8")).get("train", {}).get("steps")
        return int(steps) if steps else None
    return None


def _peer_worker(spec_json: str) -> int:
    spec = json.loads(spec_json)
    record = run_peer(spec["overrides"], spec["output"], steps=spec.get("steps"), evidence=bool(spec.get("evidence")))
    record["steps_source"] = "ours' result at this seed" if spec.get("steps") else "ours' step count (computed)"
    record["overrides"] = list(spec["overrides"])
    _atomic_write_json(Path(spec["result"]), record)
    print(json.dumps({"result": spec["result"], "ndcg@10": record.get("after", {}).get("ndcg@10")}))
    return 0


# -- the summary ------------------------------------------------------------------------------------

def load_results(folder: str) -> Dict[str, List[Dict[str, Any]]]:
    """``{configuration name: [result records, by seed]}`` of every ``<name>/seed<k>.json``
    in ``folder``. Raises ValueError naming a file that is not valid JSON."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"results folder {str(root)!r} does not exist")
    out: Dict[str, List[Dict[str, Any]]] = {}
    for path in sorted(root.glob("*/seed*.json")):
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        out.setdefault(path.parent.name, []).append(rec)
    for recs in out.values():
        recs.sort(key=lambda r: r.get("seed", 0))
    order = list(CONFIGURATIONS)
    return dict(sorted(out.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))


def seed_stats(values: List[float]) -> Dict[str, float]:
    """n, mean, min, max and sample std (0 for one value) of a metric over seeds."""
    return {"n": len(values), "mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _paired(recs: List[Dict[str, Any]], refs: List[Dict[str, Any]]) -> Optional[Dict[str, float]]:
    """Paired bootstrap (``contrastkit.evaluation.paired_bootstrap``, 10,000 resamples of the
    test queries) of per-query nDCG@10 of ``recs`` minus ``refs``, over the seeds both have:
    each query's value is first averaged over those seeds. None without a common seed."""
    from ..evaluation import paired_bootstrap

    mine = {r["seed"]: r["per_query"] for r in recs if r.get("per_query")}
    theirs = {r["seed"]: r["per_query"] for r in refs if r.get("per_query")}
    seeds = sorted(set(mine) & set(theirs))
    if not seeds:
        return None
    ids = mine[seeds[0]]["query_ids"]
    for s in seeds:
        if mine[s]["query_ids"] != ids or theirs[s]["query_ids"] != ids:
            raise ValueError(f"seed {s}: the per-query test scores are over different queries; the runs did not "
                             "evaluate the same test split")
    a = [statistics.fmean(theirs[s]["after"][i] for s in seeds) for i in range(len(ids))]
    b = [statistics.fmean(mine[s]["after"][i] for s in seeds) for i in range(len(ids))]
    out = paired_bootstrap(a, b, n_resamples=10_000, seed=0)
    return {"mean_diff": out["mean_diff"], "low": out["low"], "high": out["high"], "p_value": out["p_value"],
            "seeds": seeds}


def summarize(results: Dict[str, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """One row per configuration: test nDCG@10 (n, mean, min, max, sample std over seeds),
    STS-B Spearman mean, pipeline wall seconds mean, and the ratios of nDCG@10 and wall time
    to the peer's means (None without a peer); ``diff_vs_peer`` / ``diff_vs_ours``: the paired
    bootstrap of per-query nDCG@10 against the peer / ours (see :func:`_paired`; None where the
    records have no per-query scores or no common seed). A first row ``base`` is the base model
    (the "before" numbers of ours).

    Example::

        from contrastkit.bench.train import summarize
        recs = {"ours": [{"seed": 0, "after": {"ndcg@10": 0.7}, "wall_seconds": 90.0}],
                "peer": [{"seed": 0, "after": {"ndcg@10": 0.6}, "wall_seconds": 60.0}]}
        rows = summarize(recs)
        assert abs(rows[0]["ndcg_vs_peer"] - 0.7 / 0.6) < 1e-12 and rows[0]["time_vs_peer"] == 1.5
    """
    rows: List[Dict[str, Any]] = []
    before = [r["before"] for recs in results.values() for r in recs if r.get("before")]
    if before:
        b = before[0]
        sts_b = next((r["sts"]["before"]["spearman"] for recs in results.values() for r in recs
                      if r.get("sts", {}).get("before")), None)
        rows.append({"name": "base", "seeds": [], "ndcg": seed_stats([b["ndcg@10"]]), "sts": sts_b, "wall": None,
                     "points": [b["ndcg@10"]], "note": "base model, before training"})
    for name, recs in results.items():
        ok = [r for r in recs if "after" in r]
        if not ok:
            continue
        c = CONFIGURATIONS.get(name)
        sts = [r["sts"]["after"]["spearman"] for r in ok if r.get("sts", {}).get("after")]
        walls = [float(r["wall_seconds"]) for r in ok if r.get("wall_seconds") is not None]
        rows.append({"name": name, "seeds": [r.get("seed") for r in ok],
                     "ndcg": seed_stats([r["after"]["ndcg@10"] for r in ok]),
                     "sts": statistics.fmean(sts) if sts else None,
                     "wall": statistics.fmean(walls) if walls else None,
                     "points": [r["after"]["ndcg@10"] for r in ok],
                     "note": (c.description if c else "") + ("" if (c is None or c.all_seeds) else " (one seed)")})
    peer = next((r for r in rows if r["name"] == "peer"), None)
    for r in rows:
        if r["name"] != "base":
            for ref in ("peer", "ours"):
                r[f"diff_vs_{ref}"] = _paired(results.get(r["name"], []), results.get(ref, [])) \
                    if r["name"] != ref else None
        r["ndcg_vs_peer"] = r["ndcg"]["mean"] / peer["ndcg"]["mean"] if peer and peer["ndcg"]["mean"] else None
        r["time_vs_peer"] = r["wall"] / peer["wall"] if peer and peer["wall"] and r["wall"] is not None else None
    return rows


def _f(v: Optional[float], fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _diff(d: Optional[Dict[str, float]]) -> str:
    return "-" if not d else f"{d['mean_diff']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"


def summary_markdown(rows: List[Dict[str, Any]]) -> str:
    """The summary rows as a markdown table (see :func:`summarize`)."""
    lines = ["| configuration | seeds | test nDCG@10 mean | min..max | std | STS-B Spearman | wall s | "
             "nDCG@10 / peer | time / peer | Δ vs peer [95% CI] | Δ vs ours [95% CI] | what |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n = r["ndcg"]
        seeds = ",".join(str(s) for s in r["seeds"]) if r["seeds"] else "-"
        lines.append(f"| {r['name']} | {seeds} (n={n['n']}) | {n['mean']:.4f} | {n['min']:.4f}..{n['max']:.4f} | "
                     f"{n['std']:.4f} | {_f(r['sts'], '.4f')} | {_f(r['wall'], '.0f')} | "
                     f"{_f(r['ndcg_vs_peer'], '.3f')} | {_f(r['time_vs_peer'], '.2f')} | "
                     f"{_diff(r.get('diff_vs_peer'))} | {_diff(r.get('diff_vs_ours'))} | {r['note']} |")
    return "\n".join(lines)


def phase_means(results: Dict[str, List[Dict[str, Any]]]) -> Tuple[List[str], Dict[str, Dict[str, float]]]:
    """(phase names in first-seen order, {configuration: {phase: mean seconds over its seeds}})."""
    names: List[str] = []
    for recs in results.values():
        for r in recs:
            for k in r.get("phases", {}):
                if k not in names:
                    names.append(k)
    means = {}
    for name, recs in results.items():
        vals = {k: [r["phases"][k] for r in recs if k in r.get("phases", {})] for k in names}
        means[name] = {k: statistics.fmean(v) for k, v in vals.items() if v}
    return names, means


def _phases_markdown(results: Dict[str, List[Dict[str, Any]]]) -> str:
    names, means = phase_means(results)
    lines = ["| configuration | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for name, m in means.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.0f}" if k in m else "-" for k in names) + " |")
    return "\n".join(lines)


def write_summary(folder: str) -> str:
    """Read the results in ``folder``, write ``summary.md``, ``summary.png`` (test nDCG@10 per
    seed) and ``summary_time.png`` (mean seconds per phase) there and return the markdown text."""
    from .plots import phase_bars

    results = load_results(folder)
    rows = summarize(results)
    if not rows:
        text = f"no finished result in {folder}\n"
        Path(folder, "summary.md").write_text(text, encoding="utf-8")
        return text
    text = ("# contrastkit bench train\n\n"
            "Test nDCG@10 over the whole corpus; mean, min..max and sample std over the seeds (n); STS-B test "
            "Spearman (mean); wall: the pipeline's own phase timer, mean seconds; ratios: to the peer's means; "
            "Δ: mean per-query nDCG@10 difference to the peer / to ours over the seeds both ran (each query "
            "averaged over those seeds first), 95% paired bootstrap interval over the test queries.\n\n"
            + summary_markdown(rows) + "\n\nMean seconds per phase:\n\n" + _phases_markdown(results) + "\n")
    Path(folder, "summary.md").write_text(text, encoding="utf-8")
    _figure(rows, Path(folder, "summary.png"))
    names, means = phase_means(results)
    phase_bars(list(means), [[means[c].get(k, 0.0) for k in names] for c in means], names,
               title="contrastkit bench train: mean wall seconds per phase", path=Path(folder, "summary_time.png"))
    return text


def _figure(rows: List[Dict[str, Any]], path: Path) -> None:
    from .plots import seed_scatter

    def color(name: str) -> str:
        if name == "base":
            return "tab:gray"
        c = CONFIGURATIONS.get(name)
        return "tab:orange" if c is not None and c.kind == "peer" else "tab:blue"

    colors = [color(r["name"]) for r in rows]
    seed_scatter([r["name"] for r in rows], [r["points"] for r in rows], [r["ndcg"]["mean"] for r in rows],
                 ylabel="test nDCG@10", title="contrastkit bench train: points = seeds, bar = mean", path=path,
                 colors=colors)


# -- the command -------------------------------------------------------------------------------------------

def run(args) -> int:
    """``contrastkit bench train`` (see the module doc); 0 when every configuration ran or was
    already there, 1 when one failed, 2 for bad arguments."""
    if args.peer_worker is not None:
        return _peer_worker(args.peer_worker)
    if args.table_from:
        try:
            print(write_summary(args.table_from))
        except ValueError as err:
            print(f"contrastkit bench train: {err}", file=sys.stderr)
            return 2
        return 0
    from ..training.config import ConfigError, load_config

    try:
        configs = _selected(args.only)
        common = _common_overrides(args)
        for c in configs:  # fail now on a bad override, not after hours
            load_config(overrides=[*common, *c.overrides])
    except (ValueError, ConfigError) as err:
        print(f"contrastkit bench train: {err}", file=sys.stderr)
        return 2
    if not args.seeds:
        print("contrastkit bench train: --seeds needs at least one seed", file=sys.stderr)
        return 2
    results = Path(args.results)
    plan = _plan(configs, args.seeds)
    for c, seed in plan:  # a result made with other settings is never mixed in silently
        done = results / c.name / f"seed{seed}.json"
        if done.is_file():
            try:
                saved_record = json.loads(done.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                print(f"contrastkit bench train: {done}:{err.lineno}: not valid JSON ({err.msg}); delete it to rerun "
                      "that configuration", file=sys.stderr)
                return 2
            wanted, saved = _overrides(c, seed, common), saved_record.get("overrides")
            if saved != wanted or _compared(saved_record.get("config"), c.kind) != _compared(_resolved(wanted),
                                                                                               c.kind):
                what = (f"{saved}, now {wanted}" if saved != wanted else
                        "the same --set, but other defaults (an older contrastkit, or a changed config default)")
                print(f"contrastkit bench train: {done} was made with other settings ({what}); use "
                      "another --results folder or delete that file to rerun it", file=sys.stderr)
                return 2
    results.mkdir(parents=True, exist_ok=True)
    failed = 0
    t0 = time.perf_counter()
    for c, seed in plan:
        if (results / c.name / f"seed{seed}.json").is_file():
            print(f"  {c.name} seed {seed}: done before, skipped", file=sys.stderr, flush=True)
            continue
        print(f"  [{time.perf_counter() - t0:7.0f} s] {c.name} seed {seed}: running", file=sys.stderr, flush=True)
        _, msg = _run_one(c, seed, common, results)
        failed += msg.startswith("FAILED")
        print(f"  [{time.perf_counter() - t0:7.0f} s] {c.name} seed {seed}: {msg}", file=sys.stderr, flush=True)
    print(write_summary(str(results)))
    print(f"summary: {results / 'summary.md'}, figure: {results / 'summary.png'}")
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="contrastkit bench train", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
