"""Weight-space interpolation between a base and a fine-tuned model (WiSE-FT / LM-Cocktail).

    theta(a) = (1 - a) * theta_base + a * theta_tuned,     a in [0, 1]

Wortsman et al. 2022, "Robust fine-tuning of zero-shot models" (CVPR, arXiv:2109.01903);
Xiao et al. 2023, "LM-Cocktail: Resilient Tuning of Language Models via Model Merging"
(arXiv:2311.13534). Interpolating keeps most of the in-domain gain while recovering much of
what fine-tuning forgot elsewhere; ``a`` is chosen on a dev split, never on test.

Example::

    import torch
    from contrastkit.training.interpolation import interpolate_into, snapshot
    base, tuned = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    model = torch.nn.Linear(2, 2)
    interpolate_into(model, snapshot(base), snapshot(tuned), 0.5)
    assert torch.allclose(model.weight, (base.weight + tuned.weight) / 2)
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor, nn

__all__ = ["snapshot", "interpolate_into", "choose_alpha"]


def snapshot(module: nn.Module) -> Dict[str, Tensor]:
    """A detached CPU copy of the module's state (parameters and buffers)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


@torch.no_grad()
def interpolate_into(module: nn.Module, base: Dict[str, Tensor], tuned: Dict[str, Tensor], alpha: float) -> None:
    """Load ``(1 - alpha) * base + alpha * tuned`` into ``module`` (floating tensors are
    interpolated; integer buffers such as position ids are taken from ``tuned``)."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    if base.keys() != tuned.keys():
        diff = sorted(set(base) ^ set(tuned))
        raise ValueError(f"base and tuned states differ in keys, e.g. {diff[:3]}")
    state = {}
    for k, t in tuned.items():
        b = base[k]
        if b.shape != t.shape:
            raise ValueError(f"{k}: shape {tuple(b.shape)} in base, {tuple(t.shape)} in tuned")
        state[k] = torch.lerp(b.to(t.dtype), t, float(alpha)) if t.is_floating_point() else t
    module.load_state_dict(state)


def choose_alpha(alphas, scores, *, tolerance: float = 0.0) -> int:
    """Index of the chosen weight: the smallest ``a`` whose dev score is within
    ``tolerance`` of the best dev score (closer to the base model when fine-tuning buys
    nothing measurable on dev: less forgetting for the same in-domain score).

    Example::

        from contrastkit.training.interpolation import choose_alpha
        assert choose_alpha([0.5, 0.85, 1.0], [0.74, 0.7698, 0.7699], tolerance=0.002) == 1
    """
    alphas, scores = [float(a) for a in alphas], [float(s) for s in scores]
    if not alphas or len(alphas) != len(scores):
        raise ValueError(f"need one score per alpha, got {len(alphas)} alphas and {len(scores)} scores")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    best = max(scores)
    ok = [i for i, s in enumerate(scores) if s >= best - tolerance]
    return min(ok, key=lambda i: alphas[i])
