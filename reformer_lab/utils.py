"""Small helpers shared by the notebooks and scripts."""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_all", "default_device"]


def seed_all(seed: int) -> torch.Generator:
    """Seed Python's, NumPy's and PyTorch's global generators, for notebooks and scripts.

    Library functions never call this; they take a ``torch.Generator`` or a
    seed argument instead. Returns a new CPU ``torch.Generator`` seeded with
    ``seed`` for passing to them.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def default_device() -> torch.device:
    """Return CUDA when a GPU is available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
