"""Tests for ReformerConfig and ReformerLM: shapes, causality, shared QK, loss and generation."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from reformer_lab.model import FullSelfAttention, ReformerConfig, ReformerLM

VOCAB = 11


def _lsh_available() -> bool:
    try:
        from reformer_lab.lsh import LSHSelfAttention  # noqa: F401
    except ImportError:
        return False
    return True


HAS_LSH = _lsh_available()
needs_lsh = pytest.mark.skipif(not HAS_LSH, reason="reformer_lab.lsh.LSHSelfAttention is not available")


def _model(seed: int = 0, **overrides) -> ReformerLM:
    settings_ = dict(vocab_size=VOCAB, max_seq_len=32, d_model=16, n_layers=2, n_heads=2, d_ff=32, chunk_length=8)
    settings_.update(overrides)
    model = ReformerLM(ReformerConfig(**settings_), generator=torch.Generator().manual_seed(seed))
    return model.double().eval()


def _tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


VARIANTS = [
    pytest.param({}, id="full"),
    pytest.param({"shared_qk": True}, id="full-shared-qk"),
    pytest.param({"ff_chunks": 3}, id="full-ff-chunks"),
    pytest.param({"reversible": True}, id="full-reversible"),
    pytest.param({"attention": "lsh", "hash_seed": 3}, id="lsh", marks=needs_lsh),
    pytest.param({"attention": "lsh", "hash_seed": 3, "reversible": True}, id="lsh-reversible",
                 marks=needs_lsh),
]


@pytest.mark.parametrize("overrides", VARIANTS)
@pytest.mark.parametrize("length", [1, 7, 8, 13, 32])
def test_forward_shape(overrides, length):
    model = _model(**overrides)

    logits = model(_tokens(3, length))

    assert logits.shape == (3, length, VOCAB)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("overrides", VARIANTS)
def test_causality(overrides):
    # For LSH, chunk_length 32 >= L: one chunk covers the sequence, so every
    # earlier token is a candidate and the result must equal causal attention.
    model = _model(**{**overrides, "chunk_length": 32})
    tokens = _tokens(2, 20)
    logits = model(tokens)

    for t in (0, 5, 19):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % VOCAB
        changed_logits = model(changed)

        assert torch.allclose(changed_logits[:, :t], logits[:, :t], atol=1e-10)
        assert not torch.allclose(changed_logits[:, t], logits[:, t], atol=1e-6)


def test_non_causal_model_sees_the_future():
    model = _model(causal=False)
    tokens = _tokens(1, 10)
    changed = tokens.clone()
    changed[0, 9] = (changed[0, 9] + 1) % VOCAB

    assert not torch.allclose(model(changed)[:, 0], model(tokens)[:, 0], atol=1e-6)


@settings(deadline=None, max_examples=15)
@given(length=st.integers(1, 12), n_heads=st.sampled_from([1, 2, 4]), seed=st.integers(0, 1000))
def test_full_attention_matches_sdpa(length, n_heads, seed):
    generator = torch.Generator().manual_seed(seed)
    d_model = 8
    attention = FullSelfAttention(d_model, n_heads, causal=True, shared_qk=False, dropout=0.0).double()
    x = torch.randn(2, length, d_model, generator=generator, dtype=torch.float64)

    q, k, v = attention.in_projection(x).chunk(3, dim=-1)
    heads = [t.view(2, length, n_heads, d_model // n_heads).transpose(1, 2) for t in (q, k, v)]
    reference = F.scaled_dot_product_attention(*heads, is_causal=True)
    reference = attention.out_projection(reference.transpose(1, 2).reshape(2, length, d_model))

    assert torch.allclose(attention(x), reference, atol=1e-10)


def test_shared_qk_token_skips_itself_unless_alone():
    d_model = 4
    attention = FullSelfAttention(d_model, 1, causal=True, shared_qk=True, dropout=0.0).double()
    with torch.no_grad():
        # Queries, keys and values all equal the input, and the output projection is the identity.
        attention.in_projection.weight.copy_(torch.cat([torch.eye(d_model), torch.eye(d_model)]))
        attention.out_projection.weight.copy_(torch.eye(d_model))
        attention.out_projection.bias.zero_()
    x = torch.randn(1, 5, d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    output = attention(x)

    # Position 0 has no other key, so it attends to itself.
    assert torch.allclose(output[0, 0], x[0, 0])
    # Position 1 may use keys 0 and 1 but not itself, so it copies value 0.
    assert torch.allclose(output[0, 1], x[0, 0])


def test_shared_qk_projection_sizes():
    separate = FullSelfAttention(8, 2, causal=True, shared_qk=False, dropout=0.0)
    shared = FullSelfAttention(8, 2, causal=True, shared_qk=True, dropout=0.0)

    assert shared.in_projection.weight.shape == (16, 8)
    assert separate.in_projection.weight.shape == (24, 8)


def test_padding_keys_are_ignored():
    for shared_qk in (False, True):
        attention = FullSelfAttention(8, 2, causal=False, shared_qk=shared_qk, dropout=0.0).double()
        x = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        padding = torch.tensor([[False] * 4 + [True] * 2])

        assert torch.allclose(attention(x, padding)[:, :4], attention(x[:, :4])[:, :4], atol=1e-10)


def test_loss_is_shifted_cross_entropy():
    model = _model()
    tokens = _tokens(2, 9)

    logits = model(tokens[:, :-1])
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))

    assert torch.allclose(model.loss(tokens), expected)


def test_loss_skips_ignore_index():
    model = _model()
    tokens = _tokens(1, 9)
    padded = tokens.clone()
    padded[0, -3:] = -100

    logits = model(tokens[:, :5])
    expected = F.cross_entropy(logits[0], tokens[0, 1:6])

    assert torch.allclose(model.loss(padded), expected, atol=1e-12)


def test_same_generator_same_weights():
    first = _model(seed=4)
    second = _model(seed=4)
    third = _model(seed=5)

    assert torch.equal(first.token_embedding.weight, second.token_embedding.weight)
    assert not torch.equal(first.token_embedding.weight, third.token_embedding.weight)


def test_lm_head_is_tied_to_embedding():
    model = _model()

    assert model.lm_head.weight is model.token_embedding.weight


def test_gradients_reach_every_parameter():
    model = _model(shared_qk=True).train()

    model.loss(_tokens(2, 12)).backward()

    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name


@pytest.mark.parametrize("overrides", [
    pytest.param({"dropout": 0.2}, id="full-dropout"),
    pytest.param({"attention": "lsh", "hash_seed": None, "chunk_length": 4}, id="lsh-fresh-rotations",
                 marks=needs_lsh),
])
def test_reversible_gradients_match_stored_activations(overrides):
    model = _model(reversible=True, **overrides).train()
    tokens = _tokens(2, 16)

    def gradients():
        model.zero_grad()
        torch.manual_seed(123)
        model.loss(tokens).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    recomputed = gradients()
    model.blocks.reversible = False
    stored = gradients()

    for name in stored:
        assert torch.allclose(recomputed[name], stored[name], atol=1e-9), name


@needs_lsh
def test_hash_seed_makes_forward_reproducible():
    model = _model(attention="lsh", hash_seed=11, chunk_length=4, n_buckets=4)
    tokens = _tokens(2, 32)

    assert torch.equal(model(tokens), model(tokens))


@needs_lsh
def test_no_hash_seed_draws_fresh_rotations():
    model = _model(attention="lsh", hash_seed=None, chunk_length=4, n_buckets=4)
    tokens = _tokens(2, 32)

    assert not torch.allclose(model(tokens), model(tokens))


def test_generate_greedy_is_deterministic():
    model = _model()
    prompt = _tokens(1, 4)[0]

    first = model.generate(prompt, 10, greedy=True)
    second = model.generate(prompt, 10, greedy=True)

    assert first.shape == (14,)
    assert torch.equal(first[:4], prompt)
    assert torch.equal(first, second)


def test_generate_greedy_picks_argmax():
    model = _model()
    prompt = _tokens(2, 5)

    generated = model.generate(prompt, 1, greedy=True)

    assert torch.equal(generated[:, -1], model(prompt)[:, -1].argmax(dim=-1))


def test_generate_top_k_one_equals_greedy():
    model = _model()
    prompt = _tokens(2, 3)

    sampled = model.generate(prompt, 6, top_k=1, generator=torch.Generator().manual_seed(0))

    assert torch.equal(sampled, model.generate(prompt, 6, greedy=True))


def test_generate_sampling_follows_generator():
    model = _model()
    prompt = _tokens(1, 3)

    first = model.generate(prompt, 20, generator=torch.Generator().manual_seed(1))
    second = model.generate(prompt, 20, generator=torch.Generator().manual_seed(1))

    assert torch.equal(first, second)
    assert ((first >= 0) & (first < VOCAB)).all()


def test_generate_beyond_max_seq_len():
    model = _model(max_seq_len=8)

    generated = model.generate(_tokens(1, 6), 10, greedy=True)

    assert generated.shape == (1, 16)


def test_generate_restores_training_mode():
    model = _model().train()

    model.generate(_tokens(1, 2), 2, greedy=True)

    assert model.training


def test_generate_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        _model().generate(_tokens(1, 2), 2, temperature=0.0)


def test_too_long_input_raises():
    with pytest.raises(ValueError, match="max_seq_len=32"):
        _model()(_tokens(1, 33))


def test_one_dimensional_input_raises():
    with pytest.raises(ValueError, match=r"shape \(B, L\)"):
        _model()(_tokens(1, 5)[0])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"d_model": 10, "n_heads": 4}, "divisible by n_heads"),
        ({"attention": "sparse"}, "'full' or 'lsh'"),
        ({"n_layers": 0}, "n_layers must be a positive integer"),
        ({"n_buckets": 5}, "even integer"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_config_rejects_invalid_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        ReformerConfig(**overrides)


def test_config_to_dict_round_trip():
    config = ReformerConfig(d_model=32, attention="lsh", hash_seed=3)

    assert ReformerConfig(**config.to_dict()) == config
