"""Explorers for the hash-bucket notebook: sliders over the figures of ``reformer_lab.viz.hashing``.

Each explorer redraws one plain plotting function. ``EXPLORERS`` lists each
function with the range and default of every slider, so tests and notebooks
can call the same function with fixed arguments.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import matplotlib.pyplot as plt

from ..viz.hashing import plot_circle_buckets, plot_collision_at_angle, plot_text_buckets, plot_text_recall

__all__ = ["EXPLORERS", "circle_explorer", "collision_explorer", "chunk_explorer", "recall_explorer"]

# Slider settings per argument: min, max, step and the default value.
Controls = Dict[str, Dict[str, int]]

CIRCLE_CONTROLS: Controls = {
    "n_buckets": dict(min=2, max=16, step=2, value=4),
    "seed": dict(min=0, max=20, step=1, value=0),
}
COLLISION_CONTROLS: Controls = {
    "n_buckets": dict(min=2, max=64, step=2, value=8),
    "n_hashes": dict(min=1, max=8, step=1, value=4),
    "angle_degrees": dict(min=0, max=180, step=5, value=60),
}
# Sequence lengths must be multiples of the chunk length: 16 in
# plot_text_buckets and 32 in plot_text_recall.
CHUNK_CONTROLS: Controls = {
    "sequence_length": dict(min=32, max=256, step=16, value=128),
    "n_buckets": dict(min=2, max=32, step=2, value=8),
    "n_hashes": dict(min=1, max=4, step=1, value=1),
    "seed": dict(min=0, max=20, step=1, value=0),
}
RECALL_CONTROLS: Controls = {
    "sequence_length": dict(min=256, max=2048, step=256, value=1024),
    "n_buckets": dict(min=2, max=64, step=2, value=32),
    "seed": dict(min=0, max=20, step=1, value=0),
}

EXPLORERS: Dict[str, Tuple[Callable[..., plt.Figure], Controls]] = {
    "circle": (plot_circle_buckets, CIRCLE_CONTROLS),
    "collision": (plot_collision_at_angle, COLLISION_CONTROLS),
    "chunk": (plot_text_buckets, CHUNK_CONTROLS),
    "recall": (plot_text_recall, RECALL_CONTROLS),
}


def _explorer(name: str) -> Any:
    """Build an ``ipywidgets.interactive`` that redraws ``EXPLORERS[name]`` on each slider change.

    ``interactive`` clears its output before each call, so the new figure
    replaces the old one. The sliders update on release, because one redraw
    takes up to a few seconds on a CPU.
    """
    import ipywidgets as widgets

    function, controls = EXPLORERS[name]

    def show(**kwargs: int) -> None:
        function(**kwargs)
        plt.show()

    sliders = {
        argument: widgets.IntSlider(description=argument, continuous_update=False, **settings)
        for argument, settings in controls.items()
    }
    return widgets.interactive(show, **sliders)


def circle_explorer() -> Any:
    """Return sliders for the number of buckets and the seed over ``plot_circle_buckets``."""
    return _explorer("circle")


def collision_explorer() -> Any:
    """Return sliders for buckets, rounds and angle over ``plot_collision_at_angle``."""
    return _explorer("collision")


def chunk_explorer() -> Any:
    """Return sliders for sequence length, buckets, rounds and seed over ``plot_text_buckets``."""
    return _explorer("chunk")


def recall_explorer() -> Any:
    """Return sliders for sequence length, buckets and seed over ``plot_text_recall``."""
    return _explorer("recall")
