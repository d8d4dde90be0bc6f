"""Readers: a minimal BEIR reader for (query, positive document) training pairs.

Example::

    pairs = ck.data.scifact_pairs("train")     # bundled SciFact copy
"""

from .beir import BeirDataset, data_dir, load_beir, read_jsonl, read_qrels, scifact_pairs

__all__ = ["BeirDataset", "load_beir", "scifact_pairs", "data_dir", "read_jsonl", "read_qrels"]
