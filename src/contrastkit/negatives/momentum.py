"""An exponential-moving-average (momentum) copy of an encoder (MoCo, He et al. 2020; BYOL).

    theta_ema <- m * theta_ema + (1 - m) * theta          (buffers are copied)

The copy never receives gradients; it encodes the keys that fill a
:class:`~contrastkit.negatives.MemoryQueue`, so the queued embeddings drift slowly.

Example::

    import torch
    from contrastkit.negatives import MomentumEncoder
    encoder = torch.nn.Linear(8, 4)
    key_encoder = MomentumEncoder(encoder, momentum=0.999)
    k = key_encoder(torch.randn(16, 8))  # no grad
    assert not k.requires_grad
    key_encoder.update()                 # after optimizer.step()
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
from torch import nn

__all__ = ["MomentumEncoder"]


def _check_momentum(m) -> float:
    try:
        m = float(m)
    except (TypeError, ValueError):
        raise ValueError(f"momentum must be a number in [0, 1], got {type(m).__name__}") from None
    if not (math.isfinite(m) and 0.0 <= m <= 1.0):
        raise ValueError(f"momentum must lie in [0, 1], got {m!r}")
    return m


class MomentumEncoder(nn.Module):
    """EMA copy of ``module``: ``forward`` runs the copy without gradient; ``update(momentum)``
    moves its parameters towards the online module's (``momentum`` default: the one given
    at construction; 0 copies, 1 freezes). Buffers (e.g. batch-norm statistics) are copied.

    Example::

        import torch
        from contrastkit.negatives import MomentumEncoder
        net = torch.nn.Linear(4, 2)
        ema = MomentumEncoder(net, momentum=0.99)
        keys = ema(torch.randn(8, 4))
        with torch.no_grad():
            net.bias.add_(1.0)                   # as an optimizer step would
        ema.update()                             # ema <- 0.99 ema + 0.01 net
        assert torch.allclose(ema.ema.bias, net.bias - 0.99)
    """

    def __init__(self, module: nn.Module, momentum: float = 0.999) -> None:
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ValueError(f"MomentumEncoder needs an nn.Module, got {type(module).__name__}")
        self.momentum = _check_momentum(momentum)
        # the online module is kept by reference, outside this module's parameters / state_dict
        object.__setattr__(self, "online", module)
        self.ema = copy.deepcopy(module)
        for p in self.ema.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, momentum: Optional[float] = None) -> None:
        """``ema <- m * ema + (1 - m) * online`` for parameters; buffers copied."""
        m = self.momentum if momentum is None else _check_momentum(momentum)
        online = dict(self.online.named_parameters())
        for name, p in self.ema.named_parameters():
            src = online.get(name)
            if src is None or src.shape != p.shape:
                raise ValueError(f"online module and its momentum copy differ at parameter {name!r}")
            p.mul_(m).add_(src.detach().to(p.dtype), alpha=1.0 - m)
        online_b = dict(self.online.named_buffers())
        for name, b in self.ema.named_buffers():
            src = online_b.get(name)
            if src is not None:
                b.copy_(src)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.ema(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}"
