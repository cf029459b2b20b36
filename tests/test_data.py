"""Tests for the corpora, tokenizers and windows."""

import zipfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from reformer_lab.data import (
    IGNORE_INDEX,
    ByteTokenizer,
    CharTokenizer,
    default_corpus,
    default_splits,
    evaluation_windows,
    read_enwik8,
    read_text_file,
    split_text,
    tokenizer_from_state_dict,
    training_batches,
)


def test_default_corpus_is_deterministic_and_large():
    text = default_corpus()

    assert text == default_corpus()
    assert len(text) > 100_000
    assert "assert" in text


def test_default_splits_are_contiguous_90_5_5():
    text = default_corpus()
    train, valid, test = default_splits()

    assert train + valid + test == text
    assert len(train) == pytest.approx(0.9 * len(text), abs=1)
    assert len(valid) == pytest.approx(0.05 * len(text), abs=1)


@pytest.mark.parametrize("fractions", [(0.0, 0.1), (0.5, 0.5), (0.1, 1.2)])
def test_split_text_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fraction"):
        split_text("abcdef", *fractions)


def test_read_text_file_round_trip(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("héllo wörld\n", encoding="utf-8")

    assert read_text_file(path) == "héllo wörld\n"


def test_read_text_file_missing_raises(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_text_file(tmp_path / "missing.txt")


def _fake_enwik8() -> bytes:
    pattern = bytes(range(256))
    return (pattern * (100_000_000 // 256 + 1))[:100_000_000]


def test_read_enwik8_standard_split(tmp_path):
    data = _fake_enwik8()
    path = tmp_path / "enwik8"
    path.write_bytes(data)

    train, valid, test = read_enwik8(path)

    assert (len(train), len(valid), len(test)) == (90_000_000, 5_000_000, 5_000_000)
    assert train[:10] == data[:10]
    assert valid[:10] == data[90_000_000:90_000_010]
    assert test[-10:] == data[-10:]


def test_read_enwik8_from_zip(tmp_path):
    path = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("enwik8", _fake_enwik8())

    train, valid, test = read_enwik8(path)

    assert len(valid) == 5_000_000


def test_read_enwik8_wrong_size_raises(tmp_path):
    path = tmp_path / "enwik8"
    path.write_bytes(b"short")

    with pytest.raises(ValueError, match="exactly 100000000 bytes"):
        read_enwik8(path)


@settings(deadline=None, max_examples=30)
@given(text=st.text(min_size=1, max_size=50))
def test_char_tokenizer_round_trip(text):
    tokenizer = CharTokenizer(text)

    ids = tokenizer.encode(text)

    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.vocab_size == len(set(text))


def test_char_tokenizer_unknown_character_raises():
    tokenizer = CharTokenizer("abc")

    with pytest.raises(ValueError, match="'z' is not in the tokenizer's vocabulary"):
        tokenizer.encode("abz")


def test_char_tokenizer_unknown_token_maps_to_zero():
    tokenizer = CharTokenizer("abc", unknown_token=True)

    assert tokenizer.vocab_size == 4
    assert tokenizer.encode("azc") == [1, 0, 3]
    assert tokenizer.decode([1, 0, 3]) == "a\ufffdc"


def test_char_tokenizer_state_dict_round_trip():
    tokenizer = CharTokenizer("hello", unknown_token=True)

    rebuilt = tokenizer_from_state_dict(tokenizer.state_dict())

    assert rebuilt.encode("hole?") == tokenizer.encode("hole?")


def test_byte_tokenizer_round_trip():
    tokenizer = ByteTokenizer()

    assert tokenizer.encode(b"\x00\xff") == [0, 255]
    assert tokenizer.decode(tokenizer.encode("naïve")) == "naïve"
    assert isinstance(tokenizer_from_state_dict(tokenizer.state_dict()), ByteTokenizer)


def test_training_batches_are_windows_of_the_text():
    tokens = torch.arange(1000)
    batches = training_batches(tokens, batch_size=4, seq_len=16, generator=torch.Generator().manual_seed(0))

    for _ in range(100):
        batch = next(batches)
        assert batch.shape == (4, 17)
        assert torch.equal(batch[:, 1:] - batch[:, :-1], torch.ones(4, 16, dtype=torch.long))


def test_training_batches_cover_each_target_once_per_epoch():
    seq_len, batch_size = 10, 3
    tokens = torch.arange(seq_len * batch_size * 4 + 1)  # exactly 12 windows at offset 0
    batches = training_batches(tokens, batch_size, seq_len, generator=torch.Generator().manual_seed(5))

    # Whatever the offset, the windows of one epoch never share a target.
    targets = torch.cat([next(batches)[:, 1:].reshape(-1) for _ in range(3)])
    assert len(torch.unique(targets)) == len(targets)


def test_training_batches_same_generator_same_batches():
    tokens = torch.arange(500)
    first = training_batches(tokens, 2, 8, generator=torch.Generator().manual_seed(7))
    second = training_batches(tokens, 2, 8, generator=torch.Generator().manual_seed(7))

    for _ in range(40):
        assert torch.equal(next(first), next(second))


def test_training_batches_too_little_text_raises():
    with pytest.raises(ValueError, match="too few"):
        next(training_batches(torch.arange(30), batch_size=4, seq_len=10))


@settings(deadline=None, max_examples=40)
@given(n_tokens=st.integers(2, 60), seq_len=st.integers(1, 20))
def test_evaluation_windows_score_each_target_once(n_tokens, seq_len):
    tokens = torch.arange(100, 100 + n_tokens)

    inputs, targets = evaluation_windows(tokens, seq_len)

    assert inputs.shape == targets.shape
    assert inputs.shape[1] == seq_len
    scored = targets[targets != IGNORE_INDEX]
    assert torch.equal(scored, tokens[1:])
    real = targets != IGNORE_INDEX
    assert torch.equal(targets[real] - inputs[real], torch.ones(n_tokens - 1, dtype=torch.long))


def test_evaluation_windows_padding_only_at_end():
    inputs, targets = evaluation_windows(torch.arange(10), 4)

    assert inputs.shape == (3, 4)
    assert targets[-1].tolist() == [9, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert (targets[:-1] != IGNORE_INDEX).all()


def test_evaluation_windows_one_token_raises():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluation_windows(torch.tensor([3]), 4)
