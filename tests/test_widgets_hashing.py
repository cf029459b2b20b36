"""The hash-bucket figures and explorers: every callback at its slider limits and defaults."""

import inspect

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from reformer_lab.viz.hashing import (  # noqa: E402
    embed_text,
    plot_collision_curves,
    plot_sort_and_chunk,
    recall_by_rounds,
    text_excerpt,
)
from reformer_lab.widgets.hashing import (  # noqa: E402
    EXPLORERS,
    chunk_explorer,
    circle_explorer,
    collision_explorer,
    recall_explorer,
)

BUILDERS = {
    "circle": circle_explorer,
    "collision": collision_explorer,
    "chunk": chunk_explorer,
    "recall": recall_explorer,
}


@pytest.fixture(scope="module")
def explorers():
    # Building an explorer draws its default figure once, so each is built once.
    built = {name: builder() for name, builder in BUILDERS.items()}
    plt.close("all")
    return built


@pytest.fixture(autouse=True)
def close_figures():
    plt.close("all")
    yield
    plt.close("all")


@pytest.mark.parametrize("name", sorted(EXPLORERS))
@pytest.mark.parametrize("setting", ["min", "value", "max"])
def test_explorer_callback_draws_one_figure(explorers, name, setting):
    explorer = explorers[name]
    sliders = {child.description: child for child in explorer.children if hasattr(child, "min")}
    arguments = {argument: getattr(slider, setting) for argument, slider in sliders.items()}

    explorer.f(**arguments)

    assert len(plt.get_fignums()) == 1
    assert plt.gcf().axes


@pytest.mark.parametrize("name", sorted(EXPLORERS))
def test_explorer_sliders_match_controls(explorers, name):
    function, controls = EXPLORERS[name]
    explorer = explorers[name]
    sliders = {child.description: child for child in explorer.children if hasattr(child, "min")}

    assert sorted(sliders) == sorted(controls)
    for argument, settings in controls.items():
        slider = sliders[argument]
        assert (slider.min, slider.max, slider.step, slider.value) == (
            settings["min"],
            settings["max"],
            settings["step"],
            settings["value"],
        )
        assert slider.continuous_update is False


@pytest.mark.parametrize("name", sorted(EXPLORERS))
def test_slider_defaults_match_function_defaults(name):
    # The static figure a notebook draws with the function's defaults is the
    # figure the explorer shows before any slider moves.
    function, controls = EXPLORERS[name]
    parameters = inspect.signature(function).parameters

    for argument, settings in controls.items():
        assert parameters[argument].default == settings["value"], argument


def test_embed_text_unit_vectors_keyed_by_context():
    text = "abcabcxbc"

    vectors = embed_text(text, dim=16, context=2, seed=0)

    assert vectors.shape == (9, 16)
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(9))
    # Positions 2, 5 and 8 end with "bc", positions 1 and 4 with "ab", position 7 with "xb".
    assert torch.allclose(vectors[2], vectors[5])
    assert torch.allclose(vectors[2], vectors[8])
    assert torch.allclose(vectors[1], vectors[4])
    assert not torch.allclose(vectors[4], vectors[7])
    assert torch.equal(vectors, embed_text(text, dim=16, context=2, seed=0))


def test_embed_text_rejects_empty_text_and_context():
    with pytest.raises(ValueError, match="text must contain at least one character"):
        embed_text("")
    with pytest.raises(ValueError, match="context must be a positive integer, got 0"):
        embed_text("abc", context=0)


def test_text_excerpt_length_and_range():
    assert len(text_excerpt(100, start=50)) == 100
    with pytest.raises(ValueError, match="must select a non-empty range"):
        text_excerpt(0)
    with pytest.raises(ValueError, match="must select a non-empty range"):
        text_excerpt(10, start=10**9)


def test_recall_by_rounds_never_decreases():
    vectors = embed_text(text_excerpt(512))

    recall, compared = recall_by_rounds(vectors, 16, 32, 6, top_k=4, seed=1)

    assert len(recall) == len(compared) == 6
    for fewer, more in zip(recall, recall[1:]):
        assert more >= fewer
    for fewer, more in zip(compared, compared[1:]):
        assert more >= fewer
    assert 0.0 < recall[0] <= 1.0
    assert 0.0 < compared[-1] <= 1.0


def test_recall_by_rounds_batched_matches_single():
    vectors = embed_text(text_excerpt(256))

    single = recall_by_rounds(vectors, 8, 32, 3, top_k=4, seed=2)
    batched = recall_by_rounds(vectors.expand(2, 256, vectors.shape[-1]), 8, 32, 3, top_k=4, seed=2)

    assert batched[0] == pytest.approx(single[0])
    assert batched[1] == pytest.approx(single[1])


def test_plot_functions_return_figures():
    vectors = embed_text(text_excerpt(64))

    curves = plot_collision_curves((2, 4), (1, 2), n_samples=200, angle_degrees=30)
    chunks = plot_sort_and_chunk(vectors, 4, 16, n_hashes=2, seed=3)

    assert len(curves.axes[0].get_lines()) >= 4
    assert len(chunks.axes) == 3
