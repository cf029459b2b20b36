"""Memory calculator: how big is the score matrix, and where does a GPU run out."""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from ..memory import attention_scores_bytes, format_bytes, max_seq_len_for_memory

__all__ = ["DTYPES", "GPU_MEMORY_GIB", "attention_memory_report", "memory_calculator"]

DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

# GPU memory sizes in GiB: common 16, 48 and 80 GB cards.
GPU_MEMORY_GIB: Tuple[int, ...] = (16, 48, 80)


def attention_memory_report(seq_len: int, batch: int = 1, heads: int = 1, dtype: str = "float32") -> str:
    """Describe the score-matrix size for these settings and the longest L each GPU holds.

    ``dtype`` is one of the names in ``DTYPES``. Only the score matrix
    batch * heads * L^2 * bytes is counted; activations, weights and the
    softmax output come on top.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    size = attention_scores_bytes(seq_len, batch=batch, heads=heads, dtype=torch_dtype)
    lines: List[str] = [
        f"scores: {batch} x {heads} x {seq_len} x {seq_len} x "
        f"{torch.empty((), dtype=torch_dtype).element_size()} B = {size:,} B ({format_bytes(size)})"
    ]
    for gib in GPU_MEMORY_GIB:
        longest = max_seq_len_for_memory(gib * 1024**3, batch=batch, heads=heads, dtype=torch_dtype)
        verdict = "scores fit" if size <= gib * 1024**3 else "scores do not fit"
        lines.append(f"{gib:>3} GiB GPU: {verdict}; longest L = {longest:,}")
    return "\n".join(lines)


def memory_calculator():
    """Return an ipywidgets explorer over ``attention_memory_report``."""
    import ipywidgets as widgets

    def show(log2_seq_len: int, batch: int, heads: int, dtype: str) -> None:
        print(attention_memory_report(2**log2_seq_len, batch, heads, dtype))

    return widgets.interactive(
        show,
        log2_seq_len=widgets.IntSlider(value=16, min=6, max=20, description="log2 L"),
        batch=widgets.IntSlider(value=1, min=1, max=64, description="batch"),
        heads=widgets.IntSlider(value=1, min=1, max=32, description="heads"),
        dtype=widgets.Dropdown(options=list(DTYPES), value="float32", description="dtype"),
    )
