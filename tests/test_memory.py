"""Measured peak memory and the analytic score-matrix size."""

import pytest
import torch

from reformer_lab.memory import (
    attention_scores_bytes,
    cpu_rss_supported,
    format_bytes,
    measure_peak_memory,
)

MIB = 1024 * 1024


def test_scores_bytes_of_64k_sequence_is_16_gib():
    assert attention_scores_bytes(65536) == 17_179_869_184
    assert format_bytes(attention_scores_bytes(65536)) == "16.0 GiB"


def test_scores_bytes_scales_with_batch_heads_and_dtype():
    assert attention_scores_bytes(1024, batch=2, heads=8, dtype=torch.float16) == 2 * 8 * 1024 * 1024 * 2
    assert attention_scores_bytes(0) == 0
    assert attention_scores_bytes(3, dtype=torch.float64) == 72


@pytest.mark.parametrize("argument", ["seq_len", "batch", "heads"])
def test_scores_bytes_rejects_bad_sizes(argument):
    with pytest.raises(ValueError, match=argument):
        attention_scores_bytes(**{"seq_len": 4, argument: -1})
    with pytest.raises(ValueError, match=argument):
        attention_scores_bytes(**{"seq_len": 4, argument: 2.0})


def test_scores_bytes_rejects_bad_dtype():
    with pytest.raises(ValueError, match="torch.dtype"):
        attention_scores_bytes(4, dtype="float32")


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * MIB) == "3.0 MiB"


def allocate_and_touch(num_bytes):
    return torch.ones(num_bytes // 4, dtype=torch.float32)


def allocate_temporaries(num_bytes):
    # Two live buffers at the peak, then only a scalar survives.
    first = torch.ones(num_bytes // 4)
    second = first * 2
    return (first + second).sum()


@pytest.mark.skipif(not cpu_rss_supported(), reason="needs /proc/self/clear_refs (Linux)")
def test_rss_measures_a_known_allocation():
    allocate_and_touch(MIB)  # warm up: map the operator's code first
    peak = measure_peak_memory(allocate_and_touch, 64 * MIB, method="rss")
    assert 63 * MIB <= peak <= 70 * MIB


@pytest.mark.skipif(not cpu_rss_supported(), reason="needs /proc/self/clear_refs (Linux)")
def test_rss_sees_freed_temporaries():
    allocate_temporaries(MIB)
    peak = measure_peak_memory(allocate_temporaries, 32 * MIB, method="rss")
    assert 95 * MIB <= peak <= 104 * MIB


def test_profiler_measures_a_known_allocation():
    peak = measure_peak_memory(allocate_temporaries, 32 * MIB, method="profiler")
    assert 64 * MIB <= peak <= 97 * MIB


def test_default_device_is_inferred_from_arguments():
    tensor = torch.zeros(4)
    assert measure_peak_memory(torch.clone, tensor) >= 0


def test_bad_method_and_device_raise():
    with pytest.raises(ValueError, match="method must be 'rss' or 'profiler'"):
        measure_peak_memory(allocate_and_touch, MIB, method="guess")
    with pytest.raises(ValueError, match="device must be 'cpu' or a CUDA device"):
        measure_peak_memory(allocate_and_touch, MIB, device="meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_measures_a_known_allocation():
    def allocate():
        return torch.ones(16 * MIB // 4, device="cuda")

    peak = measure_peak_memory(allocate, device="cuda")
    assert 16 * MIB <= peak <= 17 * MIB
