"""Locality-sensitive hashing and LSH attention.

``hashing``: random rotations, angular LSH, collision probabilities, and the
sort / chunk / look-back helpers. ``attention``: LSH attention and its dense
reference. ``module``: ``LSHSelfAttention``, the ``nn.Module``.
"""

from .hashing import *  # noqa: F401,F403
from .hashing import __all__ as _hashing_all

from .attention import (
    SELF_ATTENTION_LOGIT,
    default_n_buckets,
    factorise_n_buckets,
    full_shared_qk_attention,
    lsh_attention,
)
from .module import LSHSelfAttention

__all__ = list(_hashing_all) + [
    "lsh_attention",
    "full_shared_qk_attention",
    "default_n_buckets",
    "factorise_n_buckets",
    "SELF_ATTENTION_LOGIT",
    "LSHSelfAttention",
]
