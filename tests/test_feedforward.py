"""Tests for reformer_lab.feedforward: the position-wise layer and its chunked form."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from reformer_lab.feedforward import ChunkedFeedForward, FeedForward
from reformer_lab.memory import measure_peak_memory

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def forward_backward(module: nn.Module, x: torch.Tensor, seed: int = 0):
    """Return the output and the gradients of x and of every parameter for a fixed loss."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        torch.manual_seed(seed)
        output = module(x)
        weights = torch.linspace(-1, 1, output.numel(), device=x.device).reshape(output.shape)
        (output * weights).sum().backward()
    return output.detach(), x.grad, [p.grad.clone() for p in module.parameters()]


def test_feedforward_matches_formula():
    torch.manual_seed(0)
    layer = FeedForward(6, 10, activation="relu")
    x = torch.randn(2, 5, 6)
    hidden = torch.relu(x @ layer.linear_in.weight.T + layer.linear_in.bias)
    expected = hidden @ layer.linear_out.weight.T + layer.linear_out.bias
    torch.testing.assert_close(layer(x), expected)


def test_feedforward_accepts_callable_activation():
    layer = FeedForward(4, 8, activation=torch.tanh)
    assert layer(torch.randn(3, 4)).shape == (3, 4)


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None, max_examples=25)
@given(
    leading=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    length=st.integers(1, 40),
    n_chunks=st.integers(1, 50),
    seed=st.integers(0, 2**16),
)
def test_chunked_matches_unchunked(device, leading, length, n_chunks, seed):
    torch.manual_seed(seed)
    layer = FeedForward(5, 12).to(device)
    chunked = ChunkedFeedForward(layer, n_chunks)
    x = torch.randn(*leading, length, 5, device=device)
    expected = forward_backward(layer, x)
    got = forward_backward(chunked, x)
    torch.testing.assert_close(got[0], expected[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-6, rtol=1e-5)
    for got_grad, expected_grad in zip(got[2], expected[2]):
        torch.testing.assert_close(got_grad, expected_grad, atol=1e-5, rtol=1e-5)


def test_chunked_dropout_replayed_in_backward():
    # Reference: the same chunks run with ordinary autograd, drawing the same
    # dropout masks in the same order; checkpointing must replay them.
    torch.manual_seed(0)
    layer = FeedForward(4, 16, dropout=0.5)
    chunked = ChunkedFeedForward(layer, 3)

    class PlainChunks(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x):
            return torch.cat([self.layer(chunk) for chunk in x.tensor_split(3, dim=-2)], dim=-2)

    x = torch.randn(2, 10, 4)
    expected = forward_backward(PlainChunks(), x, seed=5)
    got = forward_backward(chunked, x, seed=5)
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], atol=1e-6, rtol=0)
    for got_grad, expected_grad in zip(got[2], expected[2]):
        torch.testing.assert_close(got_grad, expected_grad, atol=1e-6, rtol=0)


def test_chunked_gradcheck_float64_with_dropout():
    torch.manual_seed(0)
    chunked = ChunkedFeedForward(nn.Sequential(nn.LayerNorm(3), FeedForward(3, 7, dropout=0.3)), 3).double()
    x = torch.randn(2, 7, 3, dtype=torch.float64, requires_grad=True)

    def function(inputs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            return chunked(inputs)

    assert torch.autograd.gradcheck(function, (x,), eps=1e-6, atol=1e-6)


def test_chunked_parameters_get_gradients_without_input_grad():
    torch.manual_seed(0)
    layer = FeedForward(4, 8)
    x = torch.randn(9, 4)
    expected = forward_backward(layer, x)[2]
    layer.zero_grad(set_to_none=True)
    ChunkedFeedForward(layer, 4)(x).mul(torch.linspace(-1, 1, 36).reshape(9, 4)).sum().backward()
    for parameter, expected_grad in zip(layer.parameters(), expected):
        torch.testing.assert_close(parameter.grad, expected_grad, atol=1e-6, rtol=1e-5)


def test_chunked_no_grad_output_matches():
    torch.manual_seed(0)
    layer = FeedForward(4, 8)
    x = torch.randn(2, 11, 4)
    with torch.no_grad():
        got = ChunkedFeedForward(layer, 4)(x)
        expected = layer(x)
    assert got.grad_fn is None
    torch.testing.assert_close(got, expected)


def test_chunked_peak_memory_smaller():
    torch.manual_seed(0)
    length, d_model, d_ff = 2048, 16, 512
    x = torch.randn(1, length, d_model, requires_grad=True)
    peaks = {}
    for n_chunks in (1, 8):
        module = ChunkedFeedForward(FeedForward(d_model, d_ff), n_chunks)
        for p in module.parameters():
            p.grad = torch.zeros_like(p)

        def step():
            module(x).sum().backward()

        step()
        peaks[n_chunks] = measure_peak_memory(step, method="profiler")
    # Whole, the step holds (1, L, d_ff) hidden activations (4 MiB each);
    # in 8 chunks, one chunk's at a time.
    hidden_bytes = length * d_ff * 4
    assert peaks[1] >= hidden_bytes
    assert peaks[8] < peaks[1] / 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"d_model": 0, "d_ff": 4}, "d_model"),
        ({"d_model": 4, "d_ff": 2.5}, "d_ff"),
        ({"d_model": 4, "d_ff": 4, "dropout": 1.0}, "dropout"),
        ({"d_model": 4, "d_ff": 4, "activation": "swish"}, "activation"),
        ({"d_model": 4, "d_ff": 4, "activation": 3}, "activation"),
    ],
)
def test_feedforward_rejects_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FeedForward(**kwargs)


def test_chunked_rejects_invalid_arguments():
    with pytest.raises(ValueError, match="n_chunks"):
        ChunkedFeedForward(FeedForward(4, 4), 0)
    with pytest.raises(ValueError, match="shape"):
        ChunkedFeedForward(FeedForward(4, 4), 2)(torch.randn(4))
