"""Encoders: Hugging Face text models with pooling (``transformers`` is imported lazily).

Example::

    enc = ck.models.TextEncoder("all-MiniLM-L6-v2", normalize=True, max_length=128)
"""

from .text import BUNDLED_MODELS, TextEncoder, pool, resolve_model_path

__all__ = ["TextEncoder", "pool", "resolve_model_path", "BUNDLED_MODELS"]
