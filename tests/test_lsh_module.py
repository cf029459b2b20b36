"""LSHSelfAttention: shapes, bucket choice per length, replayable hashing, padding, errors."""

import pytest
import torch

from reformer_lab.lsh import LSHSelfAttention, full_shared_qk_attention


def make_module(**kwargs):
    torch.manual_seed(0)  # parameter initialisation only
    settings = dict(n_hashes=2, chunk_length=16, causal=True)
    settings.update(kwargs)
    return LSHSelfAttention(32, 4, **settings)


def test_one_module_serves_several_lengths():
    module = make_module(hash_seed=0)
    for length in (128, 256, 100):
        x = torch.randn(2, length, 32)
        output = module(x)
        assert output.shape == (2, length, 32)
        assert torch.isfinite(output).all()
    assert module.buckets_for_length(128) == 16
    assert module.buckets_for_length(256) == 32
    assert module.buckets_for_length(65536) == (64, 128)


def test_fixed_n_buckets_is_used_for_every_length():
    module = make_module(n_buckets=8)
    assert module.buckets_for_length(128) == 8
    assert module.buckets_for_length(4096) == 8


def test_hash_seed_replays_the_same_buckets():
    module = make_module(hash_seed=7)
    x = torch.randn(2, 96, 32)
    first = module(x)
    torch.randn(100)  # moving the default RNG must not matter
    assert torch.equal(module(x), first)
    other = make_module(hash_seed=8)
    assert not torch.allclose(other(x), first)


def test_generator_replays_the_same_buckets():
    module = make_module()
    x = torch.randn(2, 96, 32)
    first = module(x, generator=torch.Generator().manual_seed(3))
    second = module(x, generator=torch.Generator().manual_seed(3))
    third = module(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, second)
    assert not torch.allclose(first, third)


def test_default_rng_state_replays_the_same_buckets():
    module = make_module()
    x = torch.randn(2, 96, 32)
    state = torch.get_rng_state()
    first = module(x)
    torch.set_rng_state(state)
    assert torch.equal(module(x), first)


def test_one_chunk_equals_dense_attention_per_head():
    module = make_module(chunk_length=64, n_buckets=4, causal=False)
    x = torch.randn(3, 50, 32)
    mask = torch.zeros(3, 50, dtype=torch.bool)
    mask[2, 40:] = True
    qk = module.to_qk(x).view(3, 50, 4, 8).transpose(1, 2)
    v = module.to_v(x).view(3, 50, 4, 8).transpose(1, 2)
    heads = full_shared_qk_attention(qk, v, key_padding_mask=mask[:, None])
    expected = module.to_out(heads.transpose(1, 2).reshape(3, 50, 32))
    torch.testing.assert_close(module(x, mask), expected, rtol=0, atol=1e-5)


def test_padding_leaves_real_positions_unchanged():
    module = make_module(n_buckets=8, hash_seed=1)
    x = torch.randn(1, 60, 32)
    padded = torch.cat([x, torch.full((1, 4, 32), 9.0)], dim=1)
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[:, 60:] = True
    torch.testing.assert_close(module(padded, mask)[:, :60], module(x), rtol=0, atol=1e-5)


def test_gradients_reach_every_parameter():
    module = make_module(hash_seed=0, bias=True)
    x = torch.randn(2, 40, 32, requires_grad=True)
    module(x).square().sum().backward()
    assert torch.isfinite(x.grad).all()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_dropout_only_in_training():
    module = make_module(hash_seed=0, dropout=0.5)
    x = torch.randn(2, 64, 32)
    module.eval()
    assert torch.equal(module(x), module(x))
    module.train()
    assert not torch.allclose(module(x), module(x))


def test_causal_one_chunk_module_ignores_the_future():
    # With one chunk the output is exact attention, so it is strictly causal;
    # with several, future buckets can move chunk boundaries (see notebook 04).
    module = make_module(hash_seed=2, n_buckets=8, chunk_length=128)
    x = torch.randn(1, 80, 32)
    changed = x.clone()
    changed[:, 50:] = torch.randn(1, 30, 32)
    torch.testing.assert_close(module(changed)[:, :50], module(x)[:, :50], rtol=0, atol=1e-6)
    assert not torch.allclose(module(changed)[:, 50:], module(x)[:, 50:])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(d_model=30, n_heads=4), "divides d_model"),
        (dict(d_model=32, n_heads=4, n_buckets=5), "even integer"),
        (dict(d_model=32, n_heads=4, hash_seed=1.5), "hash_seed"),
        (dict(d_model=32, n_heads=4, dropout=1.0), "dropout"),
    ],
)
def test_invalid_settings_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LSHSelfAttention(**kwargs)


def test_invalid_calls_raise():
    module = make_module(hash_seed=0)
    with pytest.raises(ValueError, match="not both"):
        module(torch.randn(1, 8, 32), generator=torch.Generator())
    with pytest.raises(ValueError, match="x must have shape"):
        module(torch.randn(1, 8, 31))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        module(torch.randn(2, 8, 32), torch.zeros(2, 7, dtype=torch.bool))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_hash_seed_gives_same_buckets_on_cuda():
    module = make_module(hash_seed=5)
    x = torch.randn(2, 200, 32)
    cpu_output = module(x)
    cuda_output = module.cuda()(x.cuda())
    torch.testing.assert_close(cuda_output.cpu(), cpu_output, rtol=0, atol=1e-4)
