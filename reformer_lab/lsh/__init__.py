"""Locality-sensitive hashing and LSH attention.

``hashing``: random rotations, angular LSH, collision probabilities, and the
sort / chunk / look-back helpers. ``attention``: LSH attention and its dense
reference. ``module``: ``LSHSelfAttention``, the ``nn.Module``.
"""

from .hashing import *  # noqa: F401,F403
from .hashing import __all__ as _hashing_all

__all__ = list(_hashing_all)
