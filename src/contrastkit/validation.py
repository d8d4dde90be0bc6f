"""Input checks shared by every public entry point (objectives, engine users, data,
training, evaluation): bad input is a ValueError that names the problem (argument,
allowed values, shape, offending row), never a silent wrong answer.

This module depends on torch only, so every layer of the library may use it.

Example::

    import torch
    from contrastkit.validation import check_embeddings, check_choice
    check_embeddings("queries", torch.randn(4, 8))
    check_choice("reduction", "mean", ("mean", "sum", "none"))
    try:
        check_choice("reduction", "avg", ("mean", "sum", "none"))
    except ValueError as err:
        print(err)                      # names the argument and the allowed values
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "check_embeddings",
    "check_pair",
    "check_scale",
    "check_index",
    "check_labels",
    "check_choice",
    "check_reduction",
    "check_number",
    "REDUCTIONS",
]

REDUCTIONS = ("mean", "sum", "none")

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_embeddings(name: str, x, *, ndim: int = 2) -> Tensor:
    """A non-empty, finite floating tensor of ``ndim`` dimensions."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        want = "(N, d)" if ndim == 2 else "(N, V, d)" if ndim == 3 else f"{ndim} dims"
        raise ValueError(f"{name} must have shape {want}, got {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating tensor (float32, float64, bfloat16, float16), got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)})")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} has embedding dimension 0 (shape {tuple(x.shape)})")
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).nonzero()[0].tolist()
        kind = "NaN" if bool(torch.isnan(x).any()) else "inf"
        raise ValueError(f"{name} contains {kind} (first non-finite entry at index {tuple(bad)})")
    return x


def check_pair(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    """Two embedding tensors that can be compared: same dimension, dtype and device."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"{a_name} and {b_name} have different embedding dimensions: {a.shape[-1]} vs {b.shape[-1]}"
        )
    if a.device != b.device:
        raise ValueError(f"{a_name} is on {a.device} but {b_name} is on {b.device}; move both to one device")
    if a.dtype != b.dtype:
        raise ValueError(f"{a_name} is {a.dtype} but {b_name} is {b.dtype}; cast both to one dtype")


def check_scale(name: str, value: Union[float, Tensor], *, like: Optional[Tensor] = None,
                n_rows: Optional[int] = None) -> None:
    """A temperature (or scale): positive and finite; a tensor may be a scalar or one per row."""
    if isinstance(value, Tensor):
        if value.numel() == 0:
            raise ValueError(f"{name} is an empty tensor")
        if value.dim() > 1 or (value.dim() == 1 and value.numel() != 1 and value.numel() != n_rows):
            raise ValueError(
                f"{name} must be a scalar or have one entry per anchor row ({n_rows}), got shape {tuple(value.shape)}"
            )
        if not value.dtype.is_floating_point:
            raise ValueError(f"{name} must be a floating tensor, got {value.dtype}")
        if like is not None and value.device != like.device:
            raise ValueError(f"{name} is on {value.device} but the embeddings are on {like.device}")
        v = value.detach()
        if not bool(torch.isfinite(v).all()) or bool((v <= 0).any()):
            raise ValueError(f"{name} must be positive and finite, got {v.min().item()!r}..{v.max().item()!r}")
    else:
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be a number or a tensor, got {type(value).__name__}") from None
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be positive and finite, got {value!r}")


def check_index(name: str, index, n_rows: int, n_cols: int, device: torch.device, *,
                allow_missing: bool = True) -> Tensor:
    """One column index per row, in [0, n_cols), or -1 for a row with no positive."""
    if not isinstance(index, Tensor):
        raise ValueError(f"{name} must be a LongTensor of column indices, got {type(index).__name__}")
    if index.dtype.is_floating_point or index.dtype == torch.bool or index.is_complex():
        raise ValueError(f"{name} must be an integer tensor of column indices, got {index.dtype}")
    if index.dim() != 1 or index.shape[0] != n_rows:
        raise ValueError(f"{name} must have shape ({n_rows},) (one column per anchor), got {tuple(index.shape)}")
    if index.device != device:
        raise ValueError(f"{name} is on {index.device} but the embeddings are on {device}")
    lo = -1 if allow_missing else 0
    if index.numel() and (int(index.max()) >= n_cols or int(index.min()) < lo):
        bad = ((index >= n_cols) | (index < lo)).nonzero()[0].item()
        raise ValueError(
            f"{name}[{bad}] = {int(index[bad])} is out of range: candidates have {n_cols} rows"
            + (" (-1 marks a row without positive)" if allow_missing else "")
        )
    return index.long()


def check_labels(name: str, labels, n: int, device: torch.device) -> Tensor:
    """Integer class labels, one per row."""
    if not isinstance(labels, Tensor):
        raise ValueError(f"{name} must be an integer tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the embeddings are on {device}")
    return labels.long()


def check_choice(name: str, value, allowed: Sequence) -> None:
    """``value`` is one of ``allowed``; the ValueError lists them."""
    if value not in tuple(allowed):
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def check_reduction(reduction: str, symmetric: bool = False) -> None:
    """A known reduction (``"mean"``, ``"sum"``, ``"none"``); ``"none"`` only for one-direction
    losses (the rows and columns of a symmetric loss are different vectors)."""
    check_choice("reduction", reduction, REDUCTIONS)
    if symmetric and reduction == "none":
        raise ValueError("reduction='none' is not defined for symmetric losses (rows and columns differ)")


def check_number(name: str, value, *, low: float = 0.0, strict: bool = False, high: Optional[float] = None,
                 high_strict: bool = False) -> float:
    """A finite real number ``>= low`` (``> low`` when ``strict``), below ``high`` if given; returned as float."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got bool")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}") from None
    bad_low = v <= low if strict else v < low
    bad_high = high is not None and (v >= high if high_strict else v > high)
    if not math.isfinite(v) or bad_low or bad_high:
        rng = f"{'>' if strict else '>='} {low}" + ("" if high is None else f" and {'<' if high_strict else '<='} {high}")
        raise ValueError(f"{name} must be finite and {rng}, got {value!r}")
    return v
