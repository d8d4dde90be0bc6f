"""L2 normalisation that cannot overflow, with a lean backward: the cosine kernel's row transform.

Each row is first divided by its largest absolute entry ``a = max_i |x_i|`` (exact: the
result has entries in [-1, 1] and a norm in [1, sqrt(d)]), so the sum of squares never
overflows (float32 rows of magnitude 1e20 have ``||x||^2 = 1e40 > 3.4e38``; torch's
``F.normalize`` then returns a zero row and the loss silently becomes log M) nor
underflows (rows of magnitude 1e-20 have ``||x||^2`` below the smallest float32).
The value is

    y = x / ||x||          for every row with x != 0 (any finite magnitude)
    y = 0                  for an all-zero row

and the gradient, with one N x d buffer (``F.normalize``'s autograd backward allocates
several N x d temporaries, which matters when the loss itself is O((N + M) d)):

    dx = (g - y (y . g)) / ||x||        (all-zero rows: g / eps, as F.normalize's)

``||x|| = a ||x / a||`` is applied as two divisions so it does not overflow either. For
rows with ``||x|| >= eps`` this is exactly ``F.normalize(x, eps=eps)``; rows with
``0 < ||x|| < eps`` are normalised to unit length (``F.normalize`` would return
``x / eps``, a near-zero vector whose cosine similarities are all about 0).

Example::

    import torch
    from contrastkit.engine.normalize import l2_normalize
    x = torch.tensor([[3e20, 4e20], [3e-20, -4e-20], [0.0, 0.0]], requires_grad=True)
    y = l2_normalize(x)            # [[0.6, 0.8], [0.6, -0.8], [0, 0]]
    y[:, 0].sum().backward()
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["l2_normalize"]


class _L2Normalize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps):
        top = x.abs().amax(dim=-1, keepdim=True)
        zero = top == 0
        top = torch.where(zero, torch.ones_like(top), top)
        xs = x / top
        ns = torch.linalg.vector_norm(xs, dim=-1, keepdim=True)
        y = xs.div_(ns).masked_fill_(zero, 0.0)
        ctx.save_for_backward(y, top, ns, zero)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, g):
        y, top, ns, zero = ctx.saved_tensors
        along = (y * g).sum(-1, keepdim=True)
        dx = torch.addcmul(g, y, along, value=-1.0)
        # ||x|| = top * ns; divided one factor at a time (the product may overflow)
        dx = dx.div_(torch.where(zero, torch.full_like(ns, ctx.eps), ns)).div_(top)
        return dx, None


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """``x / ||x||`` along the last dimension, without overflow or underflow at any finite
    magnitude; an all-zero row stays 0 (gradient ``g / eps``, as ``F.normalize``'s).
    Same value and gradient as ``torch.nn.functional.normalize(x, eps=eps)`` for rows with
    ``||x|| >= eps``, lighter on memory.

    Example::

        import torch
        from contrastkit.engine.normalize import l2_normalize
        l2_normalize(torch.tensor([[1e20, 0.0]]))    # tensor([[1., 0.]])
    """
    return _L2Normalize.apply(x, eps)
