"""Exact attention: chunked against naive, masking rules, gradients, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reformer_lab.attention import chunked_attention, naive_attention


def reference_attention(q, k, v, causal=False, key_padding_mask=None):
    """Per-query loop in float64, written independently of the library."""
    q, k, v = q.double(), k.double(), v.double()
    batch_shape = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    q, k, v = (t.expand(batch_shape + t.shape[-2:]) for t in (q, k, v))
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.expand(batch_shape + key_padding_mask.shape[-1:])
    output = torch.zeros(batch_shape + (q.shape[-2], v.shape[-1]), dtype=torch.float64)
    for index in range(batch_shape.numel()):
        b = torch.unravel_index(torch.tensor(index), batch_shape) if batch_shape else ()
        b = tuple(int(i) for i in b)
        for t in range(q.shape[-2]):
            allowed = [
                s
                for s in range(k.shape[-2])
                if (not causal or s <= t) and (key_padding_mask is None or not key_padding_mask[b + (s,)])
            ]
            if not allowed:
                continue
            scores = torch.stack([q[b + (t,)] @ k[b + (s,)] / math.sqrt(q.shape[-1]) for s in allowed])
            weights = torch.softmax(scores, dim=0)
            output[b + (t,)] = sum(w * v[b + (s,)] for w, s in zip(weights, allowed))
    return output


def random_inputs(batch_shape, num_queries, num_keys, dim, value_dim, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch_shape + (num_queries, dim), generator=generator, dtype=dtype)
    k = torch.randn(batch_shape + (num_keys, dim), generator=generator, dtype=dtype)
    v = torch.randn(batch_shape + (num_keys, value_dim), generator=generator, dtype=dtype)
    return q, k, v


@settings(deadline=None, max_examples=60)
@given(
    num_queries=st.integers(1, 40),
    num_keys=st.integers(1, 40),
    dim=st.integers(1, 16),
    query_chunk_size=st.integers(1, 17),
    key_chunk_size=st.integers(1, 17),
    causal=st.booleans(),
    use_padding=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunked_matches_naive(num_queries, num_keys, dim, query_chunk_size, key_chunk_size, causal, use_padding, seed):
    if causal:
        num_keys = num_queries
    q, k, v = random_inputs((2, 3), num_queries, num_keys, dim, 5, seed=seed)
    mask = None
    if use_padding:
        mask = torch.rand((2, 1, num_keys), generator=torch.Generator().manual_seed(seed)) < 0.4
    expected = naive_attention(q, k, v, causal=causal, key_padding_mask=mask)
    actual = chunked_attention(
        q, k, v, causal=causal, key_padding_mask=mask,
        query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size,
    )
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("use_padding", [False, True])
def test_naive_matches_per_query_loop(causal, use_padding):
    q, k, v = random_inputs((2,), 9, 9, 4, 3, seed=1)
    mask = torch.tensor([[False, True, False, False, True, False, False, False, True]] * 2) if use_padding else None
    expected = reference_attention(q, k, v, causal, mask)
    actual = naive_attention(q, k, v, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(actual.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("function", [naive_attention, chunked_attention])
def test_length_one(function):
    q, k, v = random_inputs((), 1, 1, 8, 8)
    output = function(q, k, v, causal=True)
    torch.testing.assert_close(output, v)


def test_one_query_at_a_time_matches_naive():
    q, k, v = random_inputs((1,), 33, 33, 8, 8, seed=3)
    expected = naive_attention(q, k, v, causal=True)
    actual = chunked_attention(q, k, v, causal=True, query_chunk_size=1, key_chunk_size=5)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_length_not_multiple_of_chunks():
    q, k, v = random_inputs((2,), 1000, 1000, 16, 16, seed=4)
    expected = naive_attention(q, k, v, causal=True)
    actual = chunked_attention(q, k, v, causal=True, query_chunk_size=96, key_chunk_size=160)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("function", [naive_attention, chunked_attention])
def test_fully_masked_row_is_zero_without_nan(function):
    q, k, v = random_inputs((2,), 6, 6, 4, 3, dtype=torch.float64, seed=5)
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0] = True  # every key of the first sequence is padding
    output = function(q, k, v, key_padding_mask=mask)
    assert torch.equal(output[0], torch.zeros_like(output[0]))
    assert not torch.isnan(output).any()

    output.sum().backward()
    for tensor in (q, k, v):
        assert not torch.isnan(tensor.grad).any()
    assert torch.equal(q.grad[0], torch.zeros_like(q.grad[0]))
    assert torch.equal(v.grad[0], torch.zeros_like(v.grad[0]))


def test_causal_with_padding_leaves_rows_without_keys():
    # Query 0 may only see key 0, which is padding: its row has no key left.
    q, k, v = random_inputs((1,), 5, 5, 4, 3, seed=6)
    mask = torch.tensor([[True, False, False, False, False]])
    expected = naive_attention(q, k, v, causal=True, key_padding_mask=mask)
    actual = chunked_attention(q, k, v, causal=True, key_padding_mask=mask, query_chunk_size=2, key_chunk_size=2)
    assert torch.equal(expected[0, 0], torch.zeros(3))
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("function", [naive_attention, chunked_attention])
def test_large_logits_do_not_overflow(function):
    q, k, v = random_inputs((1,), 16, 16, 4, 4, seed=7)
    q = q * 1e4 / q.norm(dim=-1, keepdim=True)
    k = k * 1e4 / k.norm(dim=-1, keepdim=True)  # logits up to 5e7 after scaling
    output = function(q, k, v, causal=True)
    assert torch.isfinite(output).all()
    expected = reference_attention(q, k, v, causal=True)
    torch.testing.assert_close(output.double(), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_gradcheck(causal):
    q, k, v = random_inputs((2,), 7, 7, 3, 2, dtype=torch.float64, seed=8)
    mask = torch.tensor([[False, False, True, False, False, False, True], [True] * 7])
    inputs = tuple(t.requires_grad_(True) for t in (q, k, v))

    def attend(q, k, v):
        return chunked_attention(q, k, v, causal=causal, key_padding_mask=mask, query_chunk_size=3, key_chunk_size=2)

    assert torch.autograd.gradcheck(attend, inputs)


def test_naive_gradcheck():
    q, k, v = random_inputs((2,), 5, 6, 3, 2, dtype=torch.float64, seed=9)
    mask = torch.tensor([[False, True, False, False, False, False]] * 2)
    inputs = tuple(t.requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: naive_attention(q, k, v, key_padding_mask=mask), inputs)


def test_chunked_gradients_match_naive_with_broadcast():
    # k and v shared across heads, so their gradients sum over the broadcast dimension.
    q, _, _ = random_inputs((2, 4), 11, 11, 8, 8, seed=10)
    _, k, v = random_inputs((2, 1), 11, 11, 8, 8, seed=11)
    grads = []
    for function, options in ((naive_attention, {}), (chunked_attention, {"query_chunk_size": 4, "key_chunk_size": 3})):
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        function(*inputs, causal=True, **options).pow(2).sum().backward()
        grads.append([t.grad for t in inputs])
    for expected, actual in zip(*grads):
        assert actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_return_weights_rows_sum_to_one():
    q, k, v = random_inputs((3,), 8, 8, 4, 4, seed=12)
    output, weights = naive_attention(q, k, v, causal=True, return_weights=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 8))
    assert torch.equal(torch.triu(weights, diagonal=1), torch.zeros_like(weights))
    torch.testing.assert_close(output, weights @ v)


@pytest.mark.parametrize("function", [naive_attention, chunked_attention])
def test_causal_with_different_lengths_raises(function):
    q, k, v = random_inputs((), 4, 6, 8, 8)
    with pytest.raises(ValueError, match="causal=True needs as many queries as keys"):
        function(q, k, v, causal=True)


@pytest.mark.parametrize("function", [naive_attention, chunked_attention])
@pytest.mark.parametrize(
    "shapes, message",
    [
        (((8,), (4, 8), (4, 8)), "at least 2 dimensions"),
        (((4, 8), (4, 7), (4, 8)), "same feature size"),
        (((4, 8), (4, 8), (5, 8)), "same length Lk"),
        (((2, 4, 8), (3, 4, 8), (3, 4, 8)), "do not broadcast"),
    ],
)
def test_bad_shapes_raise(function, shapes, message):
    q, k, v = (torch.zeros(shape) for shape in shapes)
    with pytest.raises(ValueError, match=message):
        function(q, k, v)


@pytest.mark.parametrize("function", [naive_attention, chunked_attention])
def test_bad_padding_masks_raise(function):
    q, k, v = random_inputs((2, 3), 4, 4, 8, 8)
    with pytest.raises(ValueError, match="bool"):
        function(q, k, v, key_padding_mask=torch.zeros(2, 1, 4))
    with pytest.raises(ValueError, match="Lk=4"):
        function(q, k, v, key_padding_mask=torch.zeros(2, 1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\(B, 1, L\)"):
        function(q, k, v, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("size", [0, -1, 2.5, True])
def test_bad_chunk_sizes_raise(size):
    q, k, v = random_inputs((), 4, 4, 8, 8)
    with pytest.raises(ValueError, match="query_chunk_size must be a positive integer"):
        chunked_attention(q, k, v, query_chunk_size=size)
    with pytest.raises(ValueError, match="key_chunk_size must be a positive integer"):
        chunked_attention(q, k, v, key_chunk_size=size)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    q, k, v = random_inputs((2,), 300, 300, 16, 16, seed=13)
    expected = chunked_attention(q, k, v, causal=True, query_chunk_size=64, key_chunk_size=64)
    actual = chunked_attention(q.cuda(), k.cuda(), v.cuda(), causal=True, query_chunk_size=64, key_chunk_size=64)
    torch.testing.assert_close(actual.cpu(), expected, atol=1e-4, rtol=1e-4)
