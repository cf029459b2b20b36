"""Corpora, character and byte tokenizers, and fixed-length windows for language modelling.

The default corpus is the English text of Python's own reference documentation
(``pydoc_data.topics``), which every CPython installation carries, so nothing
is downloaded. Its exact text, and so its length and character set, depends on
the Python version.

Windows: a model of context length L is trained on windows of L + 1 tokens,
where the first L are the input and the last L are the targets (the input
shifted by one). Consecutive windows start L tokens apart, so each token is a
target in exactly one window.
"""

from __future__ import annotations

import os
import zipfile
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "default_corpus",
    "split_text",
    "default_splits",
    "read_text_file",
    "read_enwik8",
    "CharTokenizer",
    "ByteTokenizer",
    "tokenizer_from_state_dict",
    "training_batches",
    "evaluation_windows",
    "IGNORE_INDEX",
]

IGNORE_INDEX = -100
"""Target id that losses and metrics skip, as in ``torch.nn.functional.cross_entropy``."""

PathLike = Union[str, "os.PathLike[str]"]

# enwik8 is the first 10^8 bytes of an English Wikipedia XML dump. The standard
# split (Hutter Prize benchmark, used by Transformer-XL and the Reformer):
# the first 90M bytes train, the next 5M validate, the last 5M test.
_ENWIK8_BYTES = 100_000_000
_ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)


def default_corpus() -> str:
    """Return the text of Python's bundled reference documentation.

    The topics of ``pydoc_data.topics.topics`` are joined in sorted key order
    (``'assert'``, ``'assignment'``, ... as sorted by ``sorted``), separated by
    one blank line, so the text is the same on every run of one Python version.
    About 465 000 characters on CPython 3.11.
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip("\n") for key in sorted(topics))


def split_text(
    text: Sequence, valid_fraction: float = 0.05, test_fraction: float = 0.05
) -> Tuple[Sequence, Sequence, Sequence]:
    """Split ``text`` (a str, bytes or list) into contiguous train / validation / test parts.

    The train part is the first ``1 - valid_fraction - test_fraction`` of the
    items, the validation part the next ``valid_fraction``, the test part the
    rest. Contiguous parts keep the validation text unseen in training, unlike
    a random split of windows, which would leak neighbouring text.
    """
    for name, fraction in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"{name} must be between 0 and 1 (exclusive), got {fraction!r}")
    if valid_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"valid_fraction + test_fraction must be below 1 to leave training text, "
            f"got {valid_fraction} + {test_fraction}"
        )

    n = len(text)
    train_end = int(round(n * (1.0 - valid_fraction - test_fraction)))
    valid_end = int(round(n * (1.0 - test_fraction)))
    return text[:train_end], text[train_end:valid_end], text[valid_end:]


def default_splits() -> Tuple[str, str, str]:
    """Return the default corpus split 90 / 5 / 5 % by characters, in order."""
    return split_text(default_corpus())


def read_text_file(path: PathLike, encoding: str = "utf-8") -> str:
    """Read a whole text file (UTF-8 by default) into a string."""
    if not os.path.isfile(path):
        raise ValueError(f"text file not found: {os.fspath(path)!r}")
    with open(path, encoding=encoding) as handle:
        return handle.read()


def read_enwik8(path: PathLike) -> Tuple[bytes, bytes, bytes]:
    """Read enwik8 from ``path`` and return the standard 90M / 5M / 5M byte split.

    ``path`` is the unpacked ``enwik8`` file or the ``enwik8.zip`` archive from
    the Hutter Prize page. Nothing is downloaded. enwik8 is modelled as bytes
    (use ``ByteTokenizer``), so bits per character are bits per byte.
    """
    if not os.path.isfile(path):
        raise ValueError(
            f"enwik8 not found at {os.fspath(path)!r}; download enwik8.zip "
            f"(mattmahoney.net/dc/enwik8.zip) and pass the path to it or to the unpacked file"
        )
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            data = archive.read("enwik8")
    else:
        with open(path, "rb") as handle:
            data = handle.read()

    if len(data) != _ENWIK8_BYTES:
        raise ValueError(
            f"enwik8 must contain exactly {_ENWIK8_BYTES} bytes, got {len(data)} from "
            f"{os.fspath(path)!r}; for other files use read_text_file"
        )
    train_end = _ENWIK8_SPLIT[0]
    valid_end = train_end + _ENWIK8_SPLIT[1]
    return data[:train_end], data[train_end:valid_end], data[valid_end:]


class CharTokenizer:
    """Character-level tokenizer: one id per distinct character of the text it is built from.

    Ids follow the sorted order of the characters. With ``unknown_token=True``
    id 0 is reserved for characters that were not in the text, and ``decode``
    writes it as U+FFFD; otherwise encoding an unknown character raises
    ValueError.
    """

    UNKNOWN_CHARACTER = "\ufffd"

    def __init__(self, text: str, *, unknown_token: bool = False) -> None:
        if not isinstance(text, str) or not text:
            raise ValueError("CharTokenizer needs a non-empty str to build its vocabulary from")
        self.characters = "".join(sorted(set(text)))
        self.unknown_token = unknown_token
        offset = 1 if unknown_token else 0
        self._id_of: Dict[str, int] = {ch: i + offset for i, ch in enumerate(self.characters)}
        self._char_of: List[str] = ([self.UNKNOWN_CHARACTER] if unknown_token else []) + list(self.characters)

    @property
    def vocab_size(self) -> int:
        """Number of ids, including the unknown id when there is one."""
        return len(self._char_of)

    def encode(self, text: str) -> List[int]:
        """Map each character of ``text`` to its id."""
        if self.unknown_token:
            return [self._id_of.get(ch, 0) for ch in text]
        try:
            return [self._id_of[ch] for ch in text]
        except KeyError as error:
            raise ValueError(
                f"character {error.args[0]!r} is not in the tokenizer's vocabulary; build the "
                f"tokenizer from text that contains it, or pass unknown_token=True"
            ) from None

    def decode(self, ids: Union[Sequence[int], Tensor]) -> str:
        """Map ids back to text; ``decode(encode(s)) == s`` for known characters."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        try:
            return "".join(self._char_of[i] if i >= 0 else "" for i in ids)
        except IndexError:
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got {max(ids)}") from None

    def state_dict(self) -> dict:
        """Return the vocabulary as plain Python values, for checkpoints."""
        return {"kind": "char", "characters": self.characters, "unknown_token": self.unknown_token}

    @classmethod
    def from_state_dict(cls, state: dict) -> "CharTokenizer":
        """Rebuild a tokenizer saved by ``state_dict``."""
        return cls(state["characters"], unknown_token=state["unknown_token"])


class ByteTokenizer:
    """Byte-level tokenizer with 256 ids, for enwik8 and other byte-modelled text.

    ``encode`` takes bytes, or a str that is encoded as UTF-8 first; ``decode``
    returns a str, with invalid UTF-8 replaced by U+FFFD.
    """

    vocab_size = 256

    def encode(self, data: Union[bytes, str]) -> List[int]:
        """Map each byte to its value 0..255."""
        if isinstance(data, str):
            data = data.encode("utf-8")
        return list(data)

    def decode(self, ids: Union[Sequence[int], Tensor]) -> str:
        """Map byte values back to text."""
        if isinstance(ids, Tensor):
            ids = ids.tolist()
        return bytes(ids).decode("utf-8", errors="replace")

    def state_dict(self) -> dict:
        """Return the tokenizer kind, for checkpoints."""
        return {"kind": "byte"}


def tokenizer_from_state_dict(state: dict) -> Union[CharTokenizer, ByteTokenizer]:
    """Rebuild a character or byte tokenizer from its ``state_dict``."""
    if state.get("kind") == "byte":
        return ByteTokenizer()
    return CharTokenizer.from_state_dict(state)


def _check_window_arguments(tokens: Tensor, seq_len: int) -> None:
    if tokens.dim() != 1:
        raise ValueError(f"tokens must be a 1-D tensor of ids, got shape {tuple(tokens.shape)}")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")


def training_batches(
    tokens: Tensor,
    batch_size: int,
    seq_len: int,
    *,
    generator: Optional[torch.Generator] = None,
) -> Iterator[Tensor]:
    """Yield ``(batch_size, seq_len + 1)`` training windows forever, epoch after epoch.

    Each epoch draws a random offset in ``[0, seq_len)`` and cuts ``tokens``
    from that offset into windows of ``seq_len + 1`` that start ``seq_len``
    apart. Adjacent windows share one token, so each token is a target at most
    once per epoch. The windows are shuffled and yielded ``batch_size`` at a
    time. The
    last incomplete batch of an epoch is dropped. The random offset moves the
    window boundaries between epochs. Randomness comes from ``generator``.

    Feed ``batch[:, :-1]`` to the model and score it on ``batch[:, 1:]``, as
    ``ReformerLM.loss`` does.
    """
    _check_window_arguments(tokens, seq_len)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    fewest_windows = (len(tokens) - seq_len) // seq_len  # at the largest offset, seq_len - 1
    if fewest_windows < batch_size:
        raise ValueError(
            f"{len(tokens)} tokens are too few for batches of {batch_size} windows of "
            f"seq_len + 1 = {seq_len + 1} tokens; use a smaller batch_size or seq_len"
        )

    while True:
        offset = int(torch.randint(0, seq_len, (1,), generator=generator))
        n_windows = (len(tokens) - offset - 1) // seq_len
        starts = offset + seq_len * torch.arange(n_windows)  # (n_windows,)
        starts = starts[torch.randperm(n_windows, generator=generator)]
        positions = starts[:, None] + torch.arange(seq_len + 1)  # (n_windows, seq_len + 1)
        for first in range(0, n_windows - batch_size + 1, batch_size):
            yield tokens[positions[first : first + batch_size]]  # (batch_size, seq_len + 1)


def evaluation_windows(tokens: Tensor, seq_len: int) -> Tuple[Tensor, Tensor]:
    """Cut ``tokens`` into inputs and targets that score every token after the first once.

    Returns ``inputs`` and ``targets``, both ``(n_windows, seq_len)``. Window
    ``w`` has inputs ``tokens[w L : w L + L]`` and targets shifted by one. The
    last window is padded: inputs with id 0 and targets with ``IGNORE_INDEX``,
    so that a causal model's scores for the real tokens are unchanged and
    ``metrics.perplexity`` skips the padding. Every target appears exactly
    once, so summing the negative log-likelihood over all windows scores the
    text's ``len(tokens) - 1`` predictions once each.

    Each window starts with no context, so early tokens of a window are
    predicted from few characters; longer ``seq_len`` lowers that cost.
    """
    _check_window_arguments(tokens, seq_len)
    if len(tokens) < 2:
        raise ValueError(f"evaluation needs at least 2 tokens (one prediction), got {len(tokens)}")

    n_targets = len(tokens) - 1
    n_windows = -(-n_targets // seq_len)
    padded_length = n_windows * seq_len + 1
    padding = padded_length - len(tokens)

    inputs = torch.cat([tokens, tokens.new_zeros(padding)])[:-1]  # (n_windows * seq_len,)
    targets = torch.cat([tokens[1:], tokens.new_full((padding,), IGNORE_INDEX)])
    return inputs.view(n_windows, seq_len), targets.view(n_windows, seq_len)  # (n_windows, seq_len)
