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

__all__ = ["snapshot", "interpolate_into"]


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
