"""Input checks now live in :mod:`contrastkit.validation` (usable by data, training and
evaluation too); this name is kept so existing imports keep working."""

from ..validation import *  # noqa: F401,F403
from ..validation import __all__  # noqa: F401
