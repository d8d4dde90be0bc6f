"""contrastkit: exact, memory-bounded contrastive learning at any batch size.

Example::

    import contrastkit as ck
    loss = ck.losses.InfoNCE(temperature=0.05)(query_emb, doc_emb)
"""

from . import data, engine, evaluation, functional, losses, models, negatives, scale, search

__version__ = "0.1.0"

__all__ = ["data", "engine", "evaluation", "functional", "losses", "models", "negatives", "scale", "search",
           "__version__"]
