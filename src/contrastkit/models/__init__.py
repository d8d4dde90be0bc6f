"""Encoders: Hugging Face text models with pooling (``transformers`` is imported lazily).

Example::

    import contrastkit as ck
    enc = ck.models.TextEncoder("all-MiniLM-L6-v2", normalize=True, max_length=128)
    assert enc.encode(["a sentence"]).shape == (1, 384)
"""

from .text import BUNDLED_MODELS, TextEncoder, pool, resolve_model_path

__all__ = ["TextEncoder", "pool", "resolve_model_path", "BUNDLED_MODELS"]
