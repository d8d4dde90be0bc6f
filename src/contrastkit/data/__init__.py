"""Data: training examples and their readers (BEIR, pairs / triplets / n-tuples in
JSON lines / CSV / TSV / Parquet, corpus-only files), dev splits and unsupervised crops.

Example::

    import contrastkit as ck
    examples = ck.data.load_beir("scifact").examples("train")    # bundled SciFact copy
    train, dev = ck.data.split_dev(examples, fraction=0.1, seed=0)
"""

from .beir import BeirDataset, data_dir, iter_qrels, load_beir, read_jsonl, read_qrels, scifact_pairs
from .examples import BadRecords, Example, independent_crops, split_dev
from .readers import iter_corpus, load_corpus, load_corpus_texts, negative_column_names, read_examples
from .sts import StsData, load_sts

__all__ = ["BeirDataset", "load_beir", "scifact_pairs", "data_dir", "read_jsonl", "read_qrels", "iter_qrels",
           "Example", "BadRecords", "split_dev", "independent_crops",
           "read_examples", "iter_corpus", "load_corpus", "load_corpus_texts", "negative_column_names",
           "StsData", "load_sts"]
