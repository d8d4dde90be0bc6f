"""STS Benchmark reader: sentence pairs with a 0-5 similarity score.

The bundled copy (``contrastkit/bundled/stsbenchmark/sts-{train,dev,test}.csv``, Cer et al.,
"SemEval-2017 Task 1: Semantic Textual Similarity Multilingual and Cross-lingual Focused
Evaluation", SemEval 2017, arXiv:1708.00055) is tab-separated, one pair per line, unquoted:

    genre  filename  year  id  score  sentence1  sentence2  [license fields ...]

Example::

    from contrastkit.data.sts import load_sts
    sts = load_sts("test")               # 1,379 pairs
    sts.sentences1[0], sts.sentences2[0], sts.scores[0]
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union

__all__ = ["StsData", "load_sts", "STS_SPLITS"]

STS_SPLITS = ("train", "dev", "test")


@dataclass
class StsData:
    """Sentence pairs with gold similarity scores (STS-B: 0 to 5), aligned lists.

    ``genres`` holds the first column (``main-news``, ``main-captions``, ``main-forums``) when read
    from the STS-B files."""

    sentences1: List[str]
    sentences2: List[str]
    scores: List[float]
    genres: List[str] = field(default_factory=list)
    path: Optional[Path] = None

    def __post_init__(self) -> None:
        if not (len(self.sentences1) == len(self.sentences2) == len(self.scores)):
            raise ValueError(f"sentences1, sentences2 and scores must have the same length, got "
                             f"{len(self.sentences1)}, {len(self.sentences2)}, {len(self.scores)}")

    def __len__(self) -> int:
        return len(self.scores)


def _sts_file(split: str, path: Optional[Union[str, os.PathLike]]) -> Path:
    if split not in STS_SPLITS:
        raise ValueError(f"split must be one of {STS_SPLITS}, got {split!r}")
    if path is None:
        from .beir import data_dir

        return data_dir() / "stsbenchmark" / f"sts-{split}.csv"
    p = Path(path)
    if p.is_dir():
        return p / f"sts-{split}.csv"
    return p


def load_sts(split: str = "test", path: Optional[Union[str, os.PathLike]] = None) -> StsData:
    """Read an STS Benchmark split.

    Args:
        split: ``"train"``, ``"dev"`` or ``"test"`` (5,749 / 1,500 / 1,379 pairs in STS-B).
        path: a folder holding ``sts-<split>.csv`` or the file itself (default: the bundled copy).

    Each line needs at least 7 tab-separated fields with a numeric score in [0, 5] in the 5th
    and non-empty sentences in the 6th and 7th (fields after the 7th are license notes and are
    ignored). A malformed line is a ValueError naming the file and the line.

    Example::

        from contrastkit.data import load_sts
        sts = load_sts("dev")
        assert len(sts) == len(sts.sentences1) == len(sts.scores) and all(0 <= s <= 5 for s in sts.scores)
    """
    file = _sts_file(split, path)
    if not file.is_file():
        raise FileNotFoundError(f"STS file {file} not found")
    s1: List[str] = []
    s2: List[str] = []
    scores: List[float] = []
    genres: List[str] = []
    with open(file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            cols = line.split("\t")
            if len(cols) < 7:
                raise ValueError(f"{file}:{lineno}: expected at least 7 tab-separated fields (genre, filename, "
                                 f"year, id, score, sentence1, sentence2), got {len(cols)}")
            try:
                score = float(cols[4])
            except ValueError:
                raise ValueError(f"{file}:{lineno}: score {cols[4]!r} is not a number") from None
            if not (math.isfinite(score) and 0.0 <= score <= 5.0):
                raise ValueError(f"{file}:{lineno}: score {score} is outside [0, 5]")
            a, b = cols[5].strip(), cols[6].strip()
            if not a or not b:
                raise ValueError(f"{file}:{lineno}: empty sentence{'1' if not a else '2'}")
            s1.append(a)
            s2.append(b)
            scores.append(score)
            genres.append(cols[0])
    if not scores:
        raise ValueError(f"{file}: no sentence pairs")
    return StsData(s1, s2, scores, genres, file)
