"""Small helpers shared by the multi-view / label / margin objectives: per-row
temperatures, the two-view (SimCLR) layout, extra candidates (memory queues) and the
stable ``log(1 - exp(x))``."""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from ..engine.normalize import l2_normalize
from ..validation import check_embeddings, check_pair

__all__ = [
    "expand_temperature",
    "reject_symmetric",
    "log1mexp",
    "append_candidates",
    "two_view_layout",
]


def expand_temperature(temperature: Union[float, Tensor], n_samples: int, n_rows: int) -> Union[float, Tensor]:
    """A per-sample temperature (n_samples,) repeated over the views laid out view-major
    (row ``v * n_samples + i`` is view v of sample i) when ``n_rows`` is a multiple."""
    if (isinstance(temperature, Tensor) and temperature.dim() == 1 and temperature.numel() == n_samples
            and n_rows != n_samples and n_samples > 1 and n_rows % n_samples == 0):
        return temperature.repeat(n_rows // n_samples)
    return temperature


def reject_symmetric(symmetric, owner: str) -> None:
    """The two-view layout is ``two_view=`` since the API freeze: ``symmetric`` means "add
    the column direction" in every objective, which this one does not offer."""
    if symmetric is not None:
        raise ValueError(
            f"{owner} takes two_view= for the two-view (SimCLR, 2N anchors) layout; symmetric= means "
            f"'add the column direction' in contrastkit and {owner} does not offer it "
            f"(got symmetric={symmetric!r}: use two_view={symmetric!r})"
        )


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate near 0 and for very negative x."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def append_candidates(k: Tensor, extra: Optional[Tensor], similarity: str, name: str = "extra_candidates") -> Tensor:
    """Candidates followed by extra ones (e.g. a memory queue), normalised like ``k``."""
    if extra is None:
        return k
    if isinstance(extra, Tensor) and extra.dim() == 2 and extra.shape[0] == 0:  # an empty queue
        check_pair("candidates", k, name, extra)
        return k
    check_embeddings(name, extra)
    check_pair("candidates", k, name, extra)
    if similarity == "cosine":
        extra = l2_normalize(extra)
    return torch.cat([k, extra])


def two_view_layout(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """Stack two views (N, d) into 2N rows; return (z, positives) with i <-> i + N."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"the two views must hold the same number of samples, got {a.shape[0]} and {b.shape[0]}"
        )
    n = a.shape[0]
    idx = torch.arange(n, device=a.device)
    return torch.cat([a, b]), torch.cat([idx + n, idx])
