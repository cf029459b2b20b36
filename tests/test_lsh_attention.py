"""LSH attention: the dense oracle, a per-round reference, masking rules, gradients, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reformer_lab.lsh import (
    SELF_ATTENTION_LOGIT,
    default_n_buckets,
    factorise_n_buckets,
    full_shared_qk_attention,
    lsh_attention,
    lsh_hash,
    random_rotations,
)


def random_inputs(shape, value_dim, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    qk = torch.randn(shape, generator=generator, dtype=dtype)
    v = torch.randn(shape[:-1] + (value_dim,), generator=generator, dtype=dtype)
    return qk, v


def reference_lsh_attention(qk, v, buckets, n_total_buckets, chunk_length, causal=False, padding=None,
                            mask_other_buckets=False, correct_duplicates=False):
    """Per-round dense attention restricted to each query's chunk window, in float64.

    Written from the algorithm's description, independently of the library:
    qk ``(L, d)``, v ``(L, dv)``, buckets ``(h, L)`` from the library's hash,
    padding ``(L,)`` bool. Padding positions sort into an extra bucket after
    every real one.
    """
    qk, v = qk.double(), v.double()
    length, dim = qk.shape
    n_hashes = buckets.shape[0]
    padded_length = -(-length // chunk_length) * chunk_length
    n_chunks = padded_length // chunk_length
    qk = torch.cat([qk, qk.new_zeros(padded_length - length, dim)])
    v = torch.cat([v, v.new_zeros(padded_length - length, v.shape[1])])
    is_padding = torch.ones(padded_length, dtype=torch.bool)
    is_padding[:length] = False if padding is None else padding
    all_buckets = torch.full((n_hashes, padded_length), n_total_buckets)
    all_buckets[:, :length] = buckets
    all_buckets[:, is_padding] = n_total_buckets

    # The keys each query attends to in each round.
    visible = torch.zeros(n_hashes, padded_length, padded_length, dtype=torch.bool)
    for r in range(n_hashes):
        order = sorted(range(padded_length), key=lambda p: (int(all_buckets[r, p]), p))
        chunk_of = torch.empty(padded_length, dtype=torch.long)
        for rank, position in enumerate(order):
            chunk_of[position] = rank // chunk_length
        same = chunk_of[None, :] == chunk_of[:, None]
        previous = chunk_of[None, :] == (chunk_of[:, None] - 1) % n_chunks
        visible[r] = same | previous if n_chunks > 1 else same
        if mask_other_buckets:
            visible[r] &= all_buckets[r][None, :] == all_buckets[r][:, None]

    keys = qk / qk.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    logits = qk @ keys.T / math.sqrt(dim)
    if correct_duplicates:
        logits = logits - torch.log(visible.sum(0).clamp_min(1).double())
    logits.fill_diagonal_(SELF_ATTENTION_LOGIT)
    positions = torch.arange(padded_length)
    forbidden = is_padding[None, :].expand(padded_length, padded_length).clone()
    if causal:
        forbidden |= positions[None, :] > positions[:, None]

    output = torch.zeros(padded_length, v.shape[1], dtype=torch.float64)
    for i in range(padded_length):
        round_outputs, round_lse = [], []
        for r in range(n_hashes):
            keys_seen = visible[r, i] & ~forbidden[i]
            if not keys_seen.any():
                continue
            row = logits[i, keys_seen]
            round_lse.append(torch.logsumexp(row, 0))
            round_outputs.append(torch.softmax(row, 0) @ v[keys_seen])
        if round_outputs:
            mix = torch.softmax(torch.stack(round_lse), 0)
            output[i] = sum(w * o for w, o in zip(mix, round_outputs))
    return output[:length]


# --- the dense oracle: one chunk covers the sequence ---------------------------------------


@settings(deadline=None, max_examples=40)
@given(
    length=st.integers(1, 40),
    dim=st.integers(1, 8),
    half_buckets=st.integers(1, 8),
    n_hashes=st.integers(1, 4),
    extra=st.integers(0, 9),
    causal=st.booleans(),
    use_padding=st.booleans(),
    correct_duplicates=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_one_chunk_equals_dense_reference(length, dim, half_buckets, n_hashes, extra, causal, use_padding,
                                          correct_duplicates, seed):
    qk, v = random_inputs((2, 3, length, dim), 5, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand((2, 1, length), generator=generator) < 0.3 if use_padding else None
    expected = full_shared_qk_attention(qk, v, causal=causal, key_padding_mask=mask)
    output = lsh_attention(
        qk, v, n_buckets=2 * half_buckets, n_hashes=n_hashes, chunk_length=length + extra, causal=causal,
        key_padding_mask=mask, generator=generator, correct_duplicates=correct_duplicates,
    )
    assert output.shape == expected.shape
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)


def test_dense_reference_matches_softmax_formula():
    qk, v = random_inputs((6, 4), 3, dtype=torch.float64)
    keys = qk / qk.norm(dim=-1, keepdim=True)
    logits = qk @ keys.T / 2.0
    logits.fill_diagonal_(-1e5)
    causal_logits = logits.masked_fill(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(full_shared_qk_attention(qk, v), torch.softmax(logits, -1) @ v)
    torch.testing.assert_close(full_shared_qk_attention(qk, v, causal=True), torch.softmax(causal_logits, -1) @ v)


# --- many chunks: against the per-round reference ---------------------------------------------


@settings(deadline=None, max_examples=25)
@given(
    length=st.integers(1, 48),
    chunk_length=st.integers(1, 12),
    half_buckets=st.integers(1, 6),
    n_hashes=st.integers(1, 4),
    causal=st.booleans(),
    use_padding=st.booleans(),
    mask_other_buckets=st.booleans(),
    correct_duplicates=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunks_match_per_round_reference(length, chunk_length, half_buckets, n_hashes, causal, use_padding,
                                          mask_other_buckets, correct_duplicates, seed):
    qk, v = random_inputs((length, 6), 4, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    padding = torch.rand(length, generator=generator) < 0.25 if use_padding else None
    output, buckets = lsh_attention(
        qk, v, n_buckets=2 * half_buckets, n_hashes=n_hashes, chunk_length=chunk_length, causal=causal,
        key_padding_mask=padding, generator=generator, return_buckets=True,
        mask_other_buckets=mask_other_buckets, correct_duplicates=correct_duplicates,
    )
    expected = reference_lsh_attention(
        qk, v, buckets, 2 * half_buckets, chunk_length, causal=causal, padding=padding,
        mask_other_buckets=mask_other_buckets, correct_duplicates=correct_duplicates,
    )
    torch.testing.assert_close(output.double(), expected, rtol=0, atol=2e-5)


def test_two_chunks_look_back_without_duplicates():
    # With two chunks each looks back at the other; with one, only at itself.
    qk, v = random_inputs((16, 4), 3, seed=1)
    for chunk_length in (8, 16):
        output, buckets = lsh_attention(qk, v, n_buckets=4, n_hashes=2, chunk_length=chunk_length,
                                        generator=torch.Generator().manual_seed(0), return_buckets=True)
        expected = reference_lsh_attention(qk, v, buckets, 4, chunk_length)
        torch.testing.assert_close(output.double(), expected, rtol=0, atol=1e-5)


def test_correct_duplicates_gives_union_attention():
    # Two chunks cover the sequence in every round, so each round attends to every key.
    qk, v = random_inputs((16, 4), 3, seed=2)
    corrected = lsh_attention(qk, v, n_buckets=4, n_hashes=3, chunk_length=8, correct_duplicates=True,
                              generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(corrected, full_shared_qk_attention(qk, v), rtol=0, atol=1e-5)


def test_factorised_buckets_combine_per_factor_hashes():
    qk, v = random_inputs((1, 40, 8), 8, seed=3)
    rotations = random_rotations(8, 2 * (2 + 4), 3, generator=torch.Generator().manual_seed(0))
    _, buckets = lsh_attention(qk, v, n_buckets=(4, 8), n_hashes=3, chunk_length=8, rotations=rotations,
                               return_buckets=True)
    low = lsh_hash(qk, 4, 3, rotations=rotations[..., :2])
    high = lsh_hash(qk, 8, 3, rotations=rotations[..., 2:])
    assert torch.equal(buckets, low + 4 * high)
    assert int(buckets.max()) < 32


# --- masking rules -----------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["value", "scale_qk"])
def test_future_tokens_never_change_earlier_outputs(change):
    qk, v = random_inputs((2, 96, 8), 8, seed=4)
    settings_ = dict(n_buckets=8, n_hashes=3, chunk_length=8, causal=True)
    rotations = random_rotations(8, 8, 3, generator=torch.Generator().manual_seed(0))
    output, buckets = lsh_attention(qk, v, rotations=rotations, return_buckets=True, **settings_)
    later_outputs_changed = []
    for t in (1, 9, 40, 95):
        qk_changed, v_changed = qk.clone(), v.clone()
        if change == "value":
            v_changed[:, t] = 100.0
        else:
            qk_changed[:, t] *= 7.5  # a positive scale keeps the angle, so the buckets stay the same
        changed, changed_buckets = lsh_attention(qk_changed, v_changed, rotations=rotations, return_buckets=True,
                                                 **settings_)
        assert torch.equal(changed_buckets, buckets)
        torch.testing.assert_close(changed[:, :t], output[:, :t], rtol=0, atol=1e-6)
        later_outputs_changed.append(not torch.allclose(changed[:, t:], output[:, t:]))
    assert any(later_outputs_changed)  # the change is visible later, so the checks above can fail


def test_fully_padded_rows_are_zero_without_nan():
    qk, v = random_inputs((2, 20, 4), 3, dtype=torch.float64, seed=5)
    qk.requires_grad_(True)
    v.requires_grad_(True)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0] = True
    output = lsh_attention(qk, v, n_buckets=4, n_hashes=2, chunk_length=8, key_padding_mask=mask,
                           generator=torch.Generator().manual_seed(0))
    output.sum().backward()
    assert torch.equal(output[0], torch.zeros_like(output[0]))
    assert torch.isfinite(output).all()
    assert torch.isfinite(qk.grad).all()
    assert torch.isfinite(v.grad).all()
    assert torch.equal(v.grad[0], torch.zeros_like(v.grad[0]))


def test_causal_padded_prefix_gives_zero_rows():
    qk, v = random_inputs((10, 4), 3, seed=6)
    mask = torch.zeros(10, dtype=torch.bool)
    mask[:3] = True
    for function in (full_shared_qk_attention, None):
        if function is None:
            output = lsh_attention(qk, v, n_buckets=2, chunk_length=16, causal=True, key_padding_mask=mask)
        else:
            output = function(qk, v, causal=True, key_padding_mask=mask)
        assert torch.equal(output[:3], torch.zeros(3, 3))
        assert (output[3:].abs().sum(-1) > 0).all()


def test_self_attended_only_when_alone():
    qk, v = random_inputs((2, 4), 3, seed=7)
    output = lsh_attention(qk, v, n_buckets=2, chunk_length=4)
    torch.testing.assert_close(output[0], v[1])
    torch.testing.assert_close(output[1], v[0])
    causal = lsh_attention(qk, v, n_buckets=2, chunk_length=4, causal=True)
    torch.testing.assert_close(causal[0], v[0])
    alone = lsh_attention(qk[:1], v[:1], n_buckets=2, chunk_length=4)
    torch.testing.assert_close(alone, v[:1])


def test_padding_positions_never_influence_real_ones():
    qk, v = random_inputs((1, 50, 8), 4, seed=8)
    rotations = random_rotations(8, 8, 2, generator=torch.Generator().manual_seed(0))
    settings_ = dict(n_buckets=8, n_hashes=2, chunk_length=8, rotations=rotations)
    # Insert 6 padding positions, in the middle and at the end, filled with large
    # values. The padded length stays within the same number of chunks (7),
    # because the first chunk looks back at the last one.
    real = torch.ones(56, dtype=torch.bool)
    real[[3, 17, 18, 30, 54, 55]] = False
    padded_qk = torch.full((1, 56, 8), 50.0)
    padded_v = torch.full((1, 56, 4), -50.0)
    padded_qk[:, real], padded_v[:, real] = qk, v
    for causal in (False, True):
        unpadded = lsh_attention(qk, v, causal=causal, **settings_)
        padded = lsh_attention(padded_qk, padded_v, causal=causal, key_padding_mask=~real[None], **settings_)
        torch.testing.assert_close(padded[:, real], unpadded, rtol=0, atol=1e-6)


# --- shapes, lengths, determinism --------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 7, 31, 33, 63, 65, 129])
def test_any_length_keeps_shape(length):
    qk, v = random_inputs((2, 3, length, 8), 5, seed=length)
    output = lsh_attention(qk, v, n_buckets=4, n_hashes=2, chunk_length=32, causal=True,
                           generator=torch.Generator().manual_seed(0))
    assert output.shape == (2, 3, length, 5)
    assert torch.isfinite(output).all()
    unbatched = lsh_attention(qk[0, 0], v[0, 0], n_buckets=4, chunk_length=32)
    assert unbatched.shape == (length, 5)


def test_same_seed_same_output_and_buckets():
    qk, v = random_inputs((2, 100, 8), 8, seed=9)
    runs = [
        lsh_attention(qk, v, n_buckets=8, n_hashes=2, chunk_length=16, return_buckets=True,
                      generator=torch.Generator().manual_seed(seed))
        for seed in (11, 11, 12)
    ]
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.equal(runs[0][1], runs[1][1])
    assert not torch.equal(runs[0][1], runs[2][1])


def test_error_falls_as_rounds_grow():
    qk, v = random_inputs((8, 256, 16), 16, seed=10)
    qk = qk * 3.0  # sharper attention, so that missing the nearest keys matters
    exact = full_shared_qk_attention(qk, v, causal=True)
    errors = {}
    for n_hashes in (1, 2, 4, 8):
        output = lsh_attention(qk, v, n_buckets=16, n_hashes=n_hashes, chunk_length=16, causal=True,
                               generator=torch.Generator().manual_seed(0))
        errors[n_hashes] = (output - exact).norm() / exact.norm()
    assert errors[2] < errors[1]
    assert errors[4] < errors[2]
    assert errors[8] < errors[4]
    assert errors[8] < 0.6 * errors[1]


def test_dropout_changes_weights_only_when_set():
    qk, v = random_inputs((40, 8), 8, seed=11)
    rotations = random_rotations(8, 4, 2, generator=torch.Generator().manual_seed(0))
    plain = lsh_attention(qk, v, n_buckets=4, n_hashes=2, chunk_length=8, rotations=rotations)
    zero = lsh_attention(qk, v, n_buckets=4, n_hashes=2, chunk_length=8, rotations=rotations, dropout_p=0.0)
    dropped = lsh_attention(qk, v, n_buckets=4, n_hashes=2, chunk_length=8, rotations=rotations, dropout_p=0.5)
    assert torch.equal(plain, zero)
    assert not torch.allclose(plain, dropped)
    assert torch.isfinite(dropped).all()


# --- gradients ------------------------------------------------------------------------------


@pytest.fixture
def single_thread():
    """Run on one thread: gradcheck makes hundreds of calls on tiny tensors, where
    thread start-up costs more than the work when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)



@pytest.mark.parametrize("n_hashes", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck(n_hashes, causal, single_thread):
    qk, v = random_inputs((2, 13, 3), 2, dtype=torch.float64, seed=n_hashes)
    qk.requires_grad_(True)
    v.requires_grad_(True)
    mask = torch.zeros(2, 13, dtype=torch.bool)
    mask[1, 5] = True
    rotations = random_rotations(3, 6, n_hashes, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def attend(qk, v):
        return lsh_attention(qk, v, n_buckets=6, n_hashes=n_hashes, chunk_length=4, causal=causal,
                             key_padding_mask=mask, rotations=rotations)

    assert torch.autograd.gradcheck(attend, (qk, v), eps=1e-6, atol=1e-5)


def test_gradcheck_with_switches(single_thread):
    qk, v = random_inputs((14, 3), 2, dtype=torch.float64, seed=12)
    qk.requires_grad_(True)
    v.requires_grad_(True)
    rotations = random_rotations(3, 4, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def attend(qk, v):
        return lsh_attention(qk, v, n_buckets=4, n_hashes=2, chunk_length=4, rotations=rotations,
                             mask_other_buckets=True, correct_duplicates=True)

    assert torch.autograd.gradcheck(attend, (qk, v), eps=1e-6, atol=1e-5)


def test_gradients_match_dense_reference():
    qk, v = random_inputs((2, 30, 8), 4, dtype=torch.float64, seed=13)
    grads = []
    for function in ("lsh", "dense"):
        qk_, v_ = qk.clone().requires_grad_(True), v.clone().requires_grad_(True)
        if function == "lsh":
            output = lsh_attention(qk_, v_, n_buckets=4, n_hashes=3, chunk_length=32, causal=True)
        else:
            output = full_shared_qk_attention(qk_, v_, causal=True)
        (output * torch.linspace(-1, 1, 4, dtype=torch.float64)).sum().backward()
        grads.append((qk_.grad, v_.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


# --- bucket counts and errors -------------------------------------------------------------------


def test_default_n_buckets():
    assert default_n_buckets(1024, 64) == 32
    assert default_n_buckets(65536, 64) == 2048
    assert default_n_buckets(1000, 64) == 32
    assert default_n_buckets(10, 64) == 2
    assert factorise_n_buckets(2048) == (32, 64)
    assert factorise_n_buckets(64) == 64
    assert factorise_n_buckets(96) == 96


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_buckets=3), "even integer"),
        (dict(n_buckets=(4, 5)), "even integer"),
        (dict(n_buckets=4, n_hashes=0), "n_hashes"),
        (dict(n_buckets=4, chunk_length=0), "chunk_length"),
        (dict(n_buckets=4, dropout_p=1.0), "dropout_p"),
        (dict(n_buckets=4, rotations=torch.zeros(4, 1, 3)), "rotations must have shape"),
        (dict(n_buckets=4, key_padding_mask=torch.zeros(10)), "bool"),
        (dict(n_buckets=4, key_padding_mask=torch.zeros(9, dtype=torch.bool)), "shape"),
        (dict(n_buckets=4, key_padding_mask=torch.zeros(3, 10, dtype=torch.bool)), "broadcast"),
    ],
)
def test_invalid_arguments_raise(kwargs, message):
    qk, v = random_inputs((2, 10, 4), 4)
    with pytest.raises(ValueError, match=message):
        lsh_attention(qk, v, **kwargs)


def test_mismatched_value_shape_raises():
    with pytest.raises(ValueError, match="v must have shape"):
        lsh_attention(torch.zeros(2, 10, 4), torch.zeros(2, 9, 4), n_buckets=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    qk, v = random_inputs((2, 2, 300, 16), 16, seed=14)
    mask = torch.zeros(2, 1, 300, dtype=torch.bool)
    mask[1, :, 250:] = True
    outputs = [
        lsh_attention(qk.to(device), v.to(device), n_buckets=(4, 8), n_hashes=4, chunk_length=32, causal=True,
                      key_padding_mask=mask.to(device), generator=torch.Generator().manual_seed(0),
                      return_buckets=True)
        for device in ("cpu", "cuda")
    ]
    assert torch.equal(outputs[0][1], outputs[1][1].cpu())
    torch.testing.assert_close(outputs[1][0].cpu(), outputs[0][0], rtol=0, atol=1e-4)
