"""Tests for reformer_lab.reversible: inverse, gradients, random-number replay, memory."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from reformer_lab.feedforward import ChunkedFeedForward, FeedForward
from reformer_lab.memory import measure_peak_memory
from reformer_lab.reversible import ReversibleBlock, ReversibleSequence

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class NoisyLinear(nn.Module):
    """Linear layer followed by dropout and additive noise from torch's default generator."""

    def __init__(self, d: int, dropout: float = 0.1, noise: float = 0.1) -> None:
        super().__init__()
        self.linear = nn.Linear(d, d)
        self.dropout = nn.Dropout(dropout)
        self.noise = noise
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.dropout(torch.tanh(self.linear(x)))
        return out + self.noise * torch.randn(x.shape, dtype=x.dtype, device=x.device)


class MaskRecorder(nn.Module):
    """Multiplies by a fresh Bernoulli mask on each call and records the masks it drew."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d, d)
        self.masks: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is None:
            mask = torch.rand(x.shape, device=x.device) < 0.5
        else:
            mask = torch.rand(x.shape, generator=generator) < 0.5
        self.masks.append(mask.clone())
        return self.linear(x) * mask.to(x.device)


def make_sequence(
    depth: int, d: int, dropout: float = 0.1, n_chunks: int = 3, noise: float = 0.1
) -> ReversibleSequence:
    blocks = []
    for _ in range(depth):
        f = nn.Sequential(nn.LayerNorm(d), NoisyLinear(d, dropout, noise))
        g = ChunkedFeedForward(nn.Sequential(nn.LayerNorm(d), FeedForward(d, 2 * d, dropout=dropout)), n_chunks)
        blocks.append(ReversibleBlock(f, g))
    return ReversibleSequence(blocks)


def run_step(sequence, x1, x2, reversible, seed=0, **kwargs):
    """Return outputs, input gradients and parameter gradients of one forward + backward."""
    sequence.reversible = reversible
    sequence.zero_grad(set_to_none=True)
    for x in (x1, x2):
        x.grad = None
    with torch.random.fork_rng(devices=[x1.device] if x1.device.type == "cuda" else []):
        torch.manual_seed(seed)
        y1, y2 = sequence(x1, x2, **kwargs)
        loss = (y1 * torch.linspace(-1, 1, y1.shape[-1], device=y1.device)).sum() + (y2 ** 2).sum()
        loss.backward()
    input_grads = [None if x.grad is None else x.grad.clone() for x in (x1, x2)]
    parameter_grads = {name: p.grad.clone() for name, p in sequence.named_parameters() if p.grad is not None}
    return (y1.detach(), y2.detach()), input_grads, parameter_grads


def assert_steps_match(reversible_step, ordinary_step, atol):
    (outputs_rev, inputs_rev, params_rev), (outputs_ref, inputs_ref, params_ref) = reversible_step, ordinary_step
    for got, expected in zip(outputs_rev, outputs_ref):
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    for got, expected in zip(inputs_rev, inputs_ref):
        assert (got is None) == (expected is None)
        if got is not None:
            torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    assert params_rev.keys() == params_ref.keys()
    for name in params_ref:
        torch.testing.assert_close(params_rev[name], params_ref[name], atol=atol, rtol=0, msg=name)


def saved_activation_bytes(fn, module: nn.Module) -> int:
    """Bytes of distinct non-parameter storages that autograd saves for backward while fn runs."""
    parameter_pointers = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_pointers:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


# Inverse.


@settings(deadline=None, max_examples=20)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 12),
    d=st.integers(1, 8),
    seed=st.integers(0, 2**16),
)
def test_block_inverse_round_trip(batch, length, d, seed):
    generator = torch.Generator().manual_seed(seed)
    block = ReversibleBlock(nn.Sequential(nn.Linear(d, d), nn.Tanh()), nn.Sequential(nn.Linear(d, d), nn.GELU()))
    block = block.double()
    x1 = torch.randn(batch, length, d, generator=generator, dtype=torch.float64)
    x2 = torch.randn(batch, length, d, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        y1, y2 = block(x1, x2)
        r1, r2 = block.inverse(y1, y2)
    torch.testing.assert_close(r1, x1, atol=1e-12, rtol=0)
    torch.testing.assert_close(r2, x2, atol=1e-12, rtol=0)


def test_sequence_inverse_round_trip_float32():
    torch.manual_seed(0)
    sequence = make_sequence(depth=6, d=16, noise=0.0).eval()
    x1, x2 = torch.randn(2, 2, 20, 16).unbind(0)
    with torch.no_grad():
        y1, y2 = sequence(x1, x2)
        r1, r2 = sequence.inverse(y1, y2)
    torch.testing.assert_close(r1, x1, atol=1e-5, rtol=0)
    torch.testing.assert_close(r2, x2, atol=1e-5, rtol=0)


# Gradients against ordinary autograd.


@pytest.mark.parametrize("device", DEVICES)
@settings(deadline=None, max_examples=10)
@given(
    depth=st.integers(1, 4),
    batch=st.integers(1, 2),
    length=st.integers(1, 17),
    n_chunks=st.integers(1, 5),
    seed=st.integers(0, 2**16),
)
def test_gradients_match_ordinary_backprop(device, depth, batch, length, n_chunks, seed):
    torch.manual_seed(seed)
    sequence = make_sequence(depth, d=8, dropout=0.2, n_chunks=n_chunks).to(device)
    x1 = torch.randn(batch, length, 8, device=device, requires_grad=True)
    x2 = torch.randn(batch, length, 8, device=device, requires_grad=True)
    reversible = run_step(sequence, x1, x2, reversible=True, seed=seed)
    ordinary = run_step(sequence, x1, x2, reversible=False, seed=seed)
    assert_steps_match(reversible, ordinary, atol=1e-5)


def test_gradients_match_for_input_without_grad():
    torch.manual_seed(0)
    sequence = make_sequence(depth=3, d=8)
    x = torch.randn(2, 9, 8)
    reversible = run_step(sequence, x, x, reversible=True)
    ordinary = run_step(sequence, x, x, reversible=False)
    assert reversible[1] == [None, None]
    assert len(reversible[2]) == len(list(sequence.parameters()))
    assert_steps_match(reversible, ordinary, atol=1e-5)


def test_gradients_match_when_x1_is_x2():
    torch.manual_seed(0)
    sequence = make_sequence(depth=3, d=8)
    x = torch.randn(2, 9, 8, requires_grad=True)
    reversible = run_step(sequence, x, x, reversible=True)
    ordinary = run_step(sequence, x, x, reversible=False)
    assert_steps_match(reversible, ordinary, atol=1e-5)


def test_gradients_match_in_eval_mode():
    torch.manual_seed(0)
    sequence = make_sequence(depth=3, d=8).eval()
    x1, x2 = torch.randn(2, 2, 9, 8).unbind(0)
    x1.requires_grad_(True)
    x2.requires_grad_(True)
    reversible = run_step(sequence, x1, x2, reversible=True)
    ordinary = run_step(sequence, x1, x2, reversible=False)
    assert_steps_match(reversible, ordinary, atol=1e-5)


def test_gradients_match_with_shared_parameters():
    torch.manual_seed(0)
    d = 8
    shared_f = nn.Sequential(nn.LayerNorm(d), NoisyLinear(d))
    shared_linear = nn.Linear(d, d)
    # G of every block reuses F's linear layer too, so one parameter gets
    # gradients from F and G of several blocks.
    blocks = [ReversibleBlock(shared_f, nn.Sequential(shared_linear, nn.Tanh(), shared_f[1].linear)) for _ in range(3)]
    sequence = ReversibleSequence(blocks)
    x1, x2 = torch.randn(2, 2, 7, d).unbind(0)
    x1.requires_grad_(True)
    reversible = run_step(sequence, x1, x2, reversible=True)
    ordinary = run_step(sequence, x1, x2, reversible=False)
    assert_steps_match(reversible, ordinary, atol=1e-5)


def test_gradients_match_with_frozen_parameters():
    torch.manual_seed(0)
    sequence = make_sequence(depth=2, d=8)
    sequence.blocks[0].f.requires_grad_(False)
    x1, x2 = torch.randn(2, 2, 7, 8).unbind(0)
    reversible = run_step(sequence, x1, x2, reversible=True)
    ordinary = run_step(sequence, x1, x2, reversible=False)
    assert not any(name.startswith("blocks.0.f.") for name in reversible[2])
    assert_steps_match(reversible, ordinary, atol=1e-5)


def test_gradients_match_with_f_kwargs_generator():
    torch.manual_seed(0)
    d = 6
    blocks = [ReversibleBlock(MaskRecorder(d), nn.Linear(d, d)) for _ in range(3)]
    sequence = ReversibleSequence(blocks)
    x1, x2 = torch.randn(2, 2, 5, d).unbind(0)
    x1.requires_grad_(True)
    steps = []
    for reversible in (True, False):
        generator = torch.Generator().manual_seed(7)
        steps.append(run_step(sequence, x1, x2, reversible=reversible, f_kwargs={"generator": generator}))
    assert_steps_match(steps[0], steps[1], atol=1e-5)


def test_autograd_grad_matches_for_parameters():
    torch.manual_seed(0)
    sequence = make_sequence(depth=3, d=8)
    parameters = list(sequence.parameters())
    x = torch.randn(2, 5, 8)
    gradients = {}
    for reversible in (True, False):
        sequence.reversible = reversible
        torch.manual_seed(4)
        y1, y2 = sequence(x, x)
        gradients[reversible] = torch.autograd.grad((y1 * y2).sum(), parameters)
    for got, expected in zip(gradients[True], gradients[False]):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert all(p.grad is None for p in parameters)


def test_gradcheck_inputs_float64_with_dropout():
    torch.manual_seed(0)
    sequence = make_sequence(depth=2, d=4, dropout=0.3, n_chunks=2).double()
    x1 = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(1, 5, 4, dtype=torch.float64, requires_grad=True)

    def function(a, b):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            return sequence(a, b)

    assert torch.autograd.gradcheck(function, (x1, x2), eps=1e-6, atol=1e-6)


def test_gradcheck_parameters_float64():
    torch.manual_seed(0)
    sequence = make_sequence(depth=2, d=3, dropout=0.3, n_chunks=2).double()
    parameters = tuple(sequence.parameters())
    x1 = torch.randn(1, 4, 3, dtype=torch.float64)
    x2 = torch.randn(1, 4, 3, dtype=torch.float64)

    # gradcheck perturbs the parameter tensors in place, which the modules read.
    def function(*_parameters):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            return sequence(x1, x2)

    assert torch.autograd.gradcheck(function, parameters, eps=1e-6, atol=1e-6)


# Random-number replay.


def test_recompute_replays_masks_from_default_generator():
    torch.manual_seed(0)
    d = 4
    recorders = [MaskRecorder(d) for _ in range(2)]
    sequence = ReversibleSequence([ReversibleBlock(recorder, nn.Linear(d, d)) for recorder in recorders])
    x = torch.randn(3, 6, d, requires_grad=True)
    y1, y2 = sequence(x, x)
    (y1.sum() + y2.sum()).backward()
    for recorder in recorders:
        assert len(recorder.masks) == 2
        assert torch.equal(recorder.masks[0], recorder.masks[1])
    assert not torch.equal(recorders[0].masks[0], recorders[1].masks[0])


def test_backward_leaves_generator_state_unchanged():
    torch.manual_seed(0)
    sequence = make_sequence(depth=2, d=8, dropout=0.5)
    x = torch.randn(2, 5, 8, requires_grad=True)
    y1, y2 = sequence(x, x)
    state_after_forward = torch.get_rng_state()
    (y1.sum() + y2.sum()).backward()
    assert torch.equal(torch.get_rng_state(), state_after_forward)


# Modes without the custom backward pass.


def test_no_grad_runs_each_block_once():
    torch.manual_seed(0)
    sequence = make_sequence(depth=3, d=8)
    x = torch.randn(2, 5, 8, requires_grad=True)
    with torch.no_grad():
        y1, y2 = sequence(x, x)
    assert y1.grad_fn is None
    assert y2.grad_fn is None
    assert [block.f[1].calls for block in sequence.blocks] == [1, 1, 1]


def test_no_grad_output_matches_ordinary():
    torch.manual_seed(0)
    sequence = make_sequence(depth=3, d=8, noise=0.0).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        reversible = sequence(x, x)
        sequence.reversible = False
        ordinary = sequence(x, x)
    for got, expected in zip(reversible, ordinary):
        assert torch.equal(got, expected)


def test_training_step_runs_f_twice():
    torch.manual_seed(0)
    sequence = make_sequence(depth=3, d=8)
    x = torch.randn(2, 5, 8, requires_grad=True)
    y1, y2 = sequence(x, x)
    (y1.sum() + y2.sum()).backward()
    assert [block.f[1].calls for block in sequence.blocks] == [2, 2, 2]


# Memory.


def test_saved_activations_do_not_grow_with_depth():
    torch.manual_seed(0)
    x = torch.randn(2, 64, 16, requires_grad=True)
    saved = {}
    for reversible in (True, False):
        for depth in (2, 8):
            sequence = make_sequence(depth, d=16)
            sequence.reversible = reversible
            saved[reversible, depth] = saved_activation_bytes(lambda: sequence(x, x), sequence)
    pair_bytes = 2 * x.numel() * x.element_size()
    assert saved[True, 2] == pair_bytes
    assert saved[True, 8] == pair_bytes
    assert saved[False, 8] > 3 * saved[False, 2]


def test_measured_peak_flat_in_depth():
    torch.manual_seed(0)
    d, length = 32, 4096
    peaks = {}
    for depth in (2, 8):
        sequence = make_sequence(depth, d=d, dropout=0.0, n_chunks=8)
        x = torch.randn(1, length, d, requires_grad=True)
        for p in sequence.parameters():
            p.grad = torch.zeros_like(p)

        def step():
            y1, y2 = sequence(x, x)
            (y1.sum() + y2.sum()).backward()

        step()
        peaks[depth] = measure_peak_memory(step, method="profiler")
    # The depth-8 stack runs three times as many blocks, but keeps only one
    # pair of (1, L, d) outputs for backward, like the depth-2 stack.
    assert peaks[8] < 1.2 * peaks[2]


# Input validation.


def test_rejects_non_block():
    with pytest.raises(ValueError, match="ReversibleBlock"):
        ReversibleSequence([nn.Linear(2, 2)])


def test_rejects_mismatched_shapes():
    sequence = make_sequence(depth=1, d=4)
    with pytest.raises(ValueError, match="same shape"):
        sequence(torch.randn(1, 3, 4), torch.randn(1, 2, 4))


def test_rejects_kwargs_tensor_requiring_grad():
    d = 4
    sequence = ReversibleSequence([ReversibleBlock(MaskRecorder(d), nn.Linear(d, d))])
    x = torch.randn(1, 3, d, requires_grad=True)
    with pytest.raises(ValueError, match="requires grad"):
        sequence(x, x, f_kwargs={"generator": None, "weights": torch.ones(3, requires_grad=True)})


def test_empty_sequence_is_identity():
    sequence = ReversibleSequence([])
    x1, x2 = torch.randn(2, 1, 3, 4).unbind(0)
    y1, y2 = sequence(x1, x2)
    assert torch.equal(y1, x1)
    assert torch.equal(y2, x2)



# LSH attention as F: its rotations and attention dropout come from torch's
# default generator, so the recompute must replay them.


def make_lsh_sequence(depth: int, d: int, dropout: float) -> ReversibleSequence:
    from reformer_lab.lsh import LSHSelfAttention

    blocks = []
    for _ in range(depth):
        attention = LSHSelfAttention(d, 2, n_hashes=2, chunk_length=4, causal=True, dropout=dropout)
        f = nn.Sequential(nn.LayerNorm(d), attention)
        g = ChunkedFeedForward(nn.Sequential(nn.LayerNorm(d), FeedForward(d, 2 * d, dropout=dropout)), 2)
        blocks.append(ReversibleBlock(f, g))
    return ReversibleSequence(blocks)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_with_lsh_attention(device):
    torch.manual_seed(0)
    sequence = make_lsh_sequence(depth=3, d=8, dropout=0.1).to(device)
    x = torch.randn(2, 16, 8, device=device, requires_grad=True)
    reversible = run_step(sequence, x, x, reversible=True, seed=1)
    ordinary = run_step(sequence, x, x, reversible=False, seed=1)
    assert_steps_match(reversible, ordinary, atol=1e-5)


def test_gradcheck_with_lsh_attention_float64():
    torch.manual_seed(0)
    sequence = make_lsh_sequence(depth=2, d=4, dropout=0.1).double()
    x1 = torch.randn(1, 8, 4, dtype=torch.float64, requires_grad=True)
    x2 = torch.randn(1, 8, 4, dtype=torch.float64, requires_grad=True)

    def function(a, b):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(2)
            return sequence(a, b)

    # fast_mode checks random projections of the Jacobian, which keeps the
    # number of LSH forward passes small.
    assert torch.autograd.gradcheck(function, (x1, x2), eps=1e-6, atol=1e-6, fast_mode=True)

