"""What every objective module shares: the temperature, the common settings, the
argument checks, a citation, and one description of its work (:class:`Work`) that
the scaling layer reads instead of a list of types.

The argument scheme (one meaning per name, everywhere; see docs/api.md):

============== ==============================================================================
name           meaning
============== ==============================================================================
anchors        (N, d) rows whose loss is computed (queries, one view, one tower)
candidates     (M, d) rows the anchors are scored against (documents, the other view/tower)
features       (N, d) or (N, V, d) when anchors and candidates are the same rows
positives      LongTensor (N,): column of each anchor's positive in ``candidates`` (-1: none)
labels         integer class per row; same label = positive
temperature    logits are similarity / temperature (float, 0-d tensor, or (N,) per anchor)
learn_temperature  the module's temperature is a parameter (log-parameterised, clamped)
symmetric      add the column direction (candidate -> anchor) and average the two
two_view       anchors and candidates are two views of N samples: all 2N rows are anchors
similarity     "cosine" (L2-normalise) or "dot" (use as given)
masks          sequence of :class:`~contrastkit.engine.TileMask`: extra entries dropped
               from each anchor's denominator (false negatives)
margin         additive margin subtracted from each positive similarity before scaling
tile_size      tile of the logit matrix walked at a time (int or (rows, cols); None: auto)
reduction      "mean" over rows with a positive, "sum", or "none" (per row)
============== ==============================================================================

Functionals take the tensors positionally and every setting keyword-only; module
constructors take settings keyword-only and ``forward`` takes the tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..engine import TileMask
from ..engine.tiling import TileSize
from ..validation import REDUCTIONS, check_choice, check_number, check_reduction, check_scale

__all__ = ["Temperature", "Objective", "Work", "IndexRows", "SIMILARITIES", "resolve_temperature"]

SIMILARITIES = ("cosine", "dot")


class Temperature(nn.Module):
    """A temperature, fixed or learnable, stored in float64 (exact for float64 work).

    Learnable temperatures are parameterised as ``log(1 / temperature)`` (CLIP's logit
    scale) and clamped to ``[min_temperature, max_temperature]`` when read, so the
    optimiser cannot drive it to 0 or to infinity. The value is kept in float64 (so a
    ``.double()`` model is float64 end to end and a float32 one loses nothing until the
    objective casts it to the embeddings' dtype); ``.float()`` / ``.to(dtype)`` convert it
    like any parameter.

    Example::

        import torch, contrastkit as ck
        t = ck.losses.Temperature(0.07, learnable=True)
        a, b = torch.randn(8, 16), torch.randn(8, 16)
        loss = ck.functional.info_nce(a, b, temperature=t())
    """

    def __init__(self, temperature: float = 0.07, learnable: bool = False,
                 min_temperature: float = 0.01, max_temperature: float = 100.0) -> None:
        super().__init__()
        check_scale("temperature", temperature)
        if not (0 < min_temperature <= temperature <= max_temperature):
            raise ValueError(
                f"temperature {temperature} must lie in [min_temperature={min_temperature}, "
                f"max_temperature={max_temperature}]"
            )
        self.learnable = bool(learnable)
        self.min_temperature, self.max_temperature = float(min_temperature), float(max_temperature)
        log_scale = torch.tensor(-math.log(float(temperature)), dtype=torch.float64)
        if self.learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def forward(self) -> Tensor:
        scale = self.log_scale.exp().clamp(1.0 / self.max_temperature, 1.0 / self.min_temperature)
        return 1.0 / scale

    def extra_repr(self) -> str:
        return f"temperature={float(self()):.4g}, learnable={self.learnable}"


def resolve_temperature(temperature, scale, default: float, owner: str):
    """``temperature`` or its alias ``scale`` (= 1 / temperature, sentence-transformers'
    name); both given is a ValueError; neither gives ``default``."""
    if scale is not None:
        if temperature is not None:
            raise ValueError(f"{owner}: give temperature= or its alias scale= (= 1 / temperature), not both")
        check_scale("scale", scale, n_rows=scale.shape[0] if isinstance(scale, Tensor) and scale.dim() else None)
        return 1.0 / scale if isinstance(scale, Tensor) else 1.0 / float(scale)
    return default if temperature is None else temperature


@dataclass(frozen=True)
class Work:
    """One description of an objective's work, read by the scaling layer
    (:class:`~contrastkit.scale.DistributedLoss`) and by the docs, so that no layer keeps a
    list of objective types.

    Argument roles (names of ``forward`` arguments; ``"*name"`` is the var-positional tuple):

    - ``rows``: per-row batch tensors (one row per sample on this rank); across ranks they
      are concatenated in rank order with an autograd-aware all-gather.
    - ``labels``: per-row integer tensors concatenated with their rows (no gradient).
    - ``frozen``: per-row float tensors without gradient (teacher embeddings), concatenated.
    - ``index``: ``{argument: row argument}``: column indices into a row argument; across
      ranks they are offset by the rank's first row in that argument (-1 stays -1).
    - ``shared``: arguments that are the same on every rank (a memory queue): passed as is.

    What the loss does per row (descriptive; the scaling layer checks ``local`` and ``ring``):

    - ``positives``: ``"index"`` (one column), ``"labels"`` (same label), ``"soft"``
      (weights over all candidates), ``"views"`` (the other views), ``"pairs"``
      (independent binary terms), ``"aligned"`` (row i with row i).
    - ``self_position``: the anchor itself is among the candidates and dropped.
    - ``dropped``: what leaves each denominator besides self (``"positive"`` for DCL, ``"masks"``).
    - ``weighted``: how candidates are weighted in the denominator (``"hardness"``, ``"teacher"``...).
    - ``symmetric``, ``margin``, ``scale`` (``"temperature"`` / ``"kernel"`` / ``None``).
    - ``local``: ``"index"`` when the objective can give its own rows as an
      :class:`IndexRows` (``objective.index_rows(...)``), ``"pairs"`` for SigLIP's
      element-wise terms (``objective.pair_rows(...)``); then each rank computes only its
      rows against the gathered candidates. ``None``: the scaling layer gathers every
      per-row argument and evaluates the objective on the whole batch on every rank
      (exact, the loss computed ``world`` times; the encoders are not).
    - ``ring``: the candidate blocks may be passed round a ring instead of gathered.
    """

    rows: Tuple[str, ...]
    labels: Tuple[str, ...] = ()
    frozen: Tuple[str, ...] = ()
    index: Mapping[str, str] = field(default_factory=dict)
    shared: Tuple[str, ...] = ()
    positives: str = "index"
    self_position: bool = False
    dropped: Tuple[str, ...] = ()
    weighted: Optional[str] = None
    symmetric: bool = False
    margin: float = 0.0
    scale: Optional[str] = "temperature"
    local: Optional[str] = None
    ring: bool = False


@dataclass
class IndexRows:
    """An index-target objective's rows on this rank, prepared (normalised, laid out):
    ``loss_i = -(X_ip - shift_i) + log(exp(X_ip - shift_i) + sum_{j not dropped, j != p} exp X_ij)``
    with ``X_ij = scale_i q_i . k_j``.

    - ``anchor_blocks``: the anchors are ``cat(anchor_blocks)``; ``candidate_blocks``:
      the candidates ``cat(candidate_blocks)``. Across ranks each block is gathered on its
      own and the gathered blocks concatenated in the same order, which is the layout of
      one process on the concatenated batch.
    - ``positives`` (rows,): column of each row's positive in the local candidates (-1: none).
    - ``self_index`` (rows,) or None: column of each row's own entry (dropped) in the local candidates.
    - ``scale``: 0-dim or (rows,) 1 / temperature; ``margin``: similarity units.
    - ``masks``: user masks in the coordinates of the concatenated batch.
    """

    anchor_blocks: List[Tensor]
    candidate_blocks: List[Tensor]
    positives: Tensor
    scale: Tensor
    self_index: Optional[Tensor] = None
    margin: float = 0.0
    symmetric: bool = False
    masks: Sequence[TileMask] = ()
    tile_size: TileSize = None

    @property
    def anchors(self) -> Tensor:
        return self.anchor_blocks[0] if len(self.anchor_blocks) == 1 else torch.cat(self.anchor_blocks)

    @property
    def candidates(self) -> Tensor:
        return self.candidate_blocks[0] if len(self.candidate_blocks) == 1 else torch.cat(self.candidate_blocks)


class Objective(nn.Module):
    """Base of every ``ck.losses`` module: the settings every objective shares, checked once.

    - ``temperature``: a :class:`Temperature` (``self.temperature()`` reads it), or None for
      objectives without one (alignment / uniformity);
    - ``similarity``, ``tile_size``, ``reduction`` (like torch's losses);
    - ``citation``: BibTeX of the paper (as sentence-transformers' losses have);
    - ``work``: the :class:`Work` description the scaling layer reads.

    Subclasses set ``reductions`` when they allow fewer than mean / sum / none.

    Example::

        import torch, contrastkit as ck
        loss_fn = ck.losses.InfoNCE(temperature=0.05, reduction="sum").double()
        print(loss_fn.citation.splitlines()[0], loss_fn.temperature().dtype)   # float64
    """

    citation: str = ""
    reductions: Tuple[str, ...] = REDUCTIONS
    similarities: Tuple[str, ...] = SIMILARITIES

    def __init__(self, *, temperature: Optional[float] = None, learn_temperature: bool = False,
                 similarity: str = "cosine", tile_size: TileSize = None, reduction: str = "mean",
                 symmetric: bool = False, margin: float = 0.0, min_temperature: float = 0.01,
                 max_temperature: float = 100.0) -> None:
        super().__init__()
        check_choice("similarity", similarity, self.similarities)
        check_choice("reduction", reduction, self.reductions)
        check_reduction(reduction, symmetric)
        self.temperature = (None if temperature is None else
                            Temperature(temperature, learnable=learn_temperature,
                                        min_temperature=min_temperature, max_temperature=max_temperature))
        self.similarity, self.tile_size, self.reduction = similarity, tile_size, reduction
        self.symmetric = bool(symmetric)
        self.margin = check_number("margin", margin)

    @property
    def work(self) -> Work:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError(f"{type(self).__name__} does not describe its work")

    def _settings(self, **extra: Any) -> Dict[str, Any]:
        """The keyword arguments every functional takes, from this module's settings."""
        out: Dict[str, Any] = dict(similarity=self.similarity, tile_size=self.tile_size, reduction=self.reduction)
        if self.temperature is not None:
            out["temperature"] = self.temperature()
        out.update(extra)
        return out

    def extra_repr(self) -> str:
        parts = [f"similarity={self.similarity!r}", f"reduction={self.reduction!r}"]
        if self.symmetric:
            parts.append("symmetric=True")
        if self.margin:
            parts.append(f"margin={self.margin}")
        return ", ".join(parts)
