"""The character-level corpus of the small GPT: Shakespeare, a tokenizer and batches.

Book: chapter 5.1 (a GPT language model trained with hybrid parallelism).

The package ships about 300 KB of Shakespeare (The Tempest, Macbeth and A Midsummer
Night's Dream; origin and licence in ``nanopar/data/shakespeare/README.md``), so training
needs no download. Characters are the tokens, as in nanoGPT's ``shakespeare_char``:

    text = load_corpus()
    tok = CharTokenizer(text)
    train, val = train_val_split(tok.encode(text))
    config = models.GPTConfig.tiny(vocab_size=tok.vocab_size)
    x, y = get_batch(train, 8, config.block_size, torch.Generator().manual_seed(0))
"""
from __future__ import annotations

from collections.abc import Sequence
from importlib import resources

import torch

_CORPUS = ("data", "shakespeare", "shakespeare.txt")


def load_corpus() -> str:
    """The shipped Shakespeare text, read from the installed package (chapter 5.1)."""
    path = resources.files("nanopar")
    for part in _CORPUS:
        path = path / part
    return path.read_text(encoding="ascii")


class CharTokenizer:
    """Characters to token ids and back; the vocabulary is the sorted characters of ``text`` (chapter 5.1)."""

    def __init__(self, text: str):
        if not text:
            raise ValueError("the tokenizer needs a non-empty text to take its characters from")
        self.chars = sorted(set(text))
        self._ids = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        """The number of distinct characters: the GPT's ``vocab_size``."""
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """``text`` as a LongTensor of token ids."""
        unknown = sorted(set(text) - self._ids.keys())
        if unknown:
            raise ValueError(f"characters {unknown} are not in the tokenizer's vocabulary: build the "
                             "tokenizer from a text that contains them (e.g. the whole corpus)")
        return torch.tensor([self._ids[c] for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """The text of a sequence of token ids (a 1-D tensor or a list)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary of {self.vocab_size} characters")
        return "".join(self.chars[i] for i in ids)


def train_val_split(tokens: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``1 - val_fraction`` of the tokens for training, the rest for validation (chapter 5.1).

    A split in one place (not random samples) keeps validation text unseen in training.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
    n_val = round(len(tokens) * val_fraction)
    if not 0 < n_val < len(tokens):
        raise ValueError(f"{len(tokens)} tokens are too few to hold out a fraction of {val_fraction}: "
                         "use more text or another val_fraction")
    return tokens[:-n_val], tokens[-n_val:]


def get_batch(tokens: torch.Tensor, batch: int, block_size: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random windows of ``block_size`` tokens ``x`` and the next tokens ``y`` (chapter 5.1).

    ``y`` is ``x`` shifted by one: position t's target is the token after it. The windows
    depend only on ``generator``'s state, so every rank seeded alike draws the same batch.
    """
    for name, value in (("batch", batch), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if len(tokens) <= block_size:
        raise ValueError(f"a block of {block_size} tokens plus its next-token target needs at least "
                         f"{block_size + 1} tokens, but there are {len(tokens)}: use a smaller block_size "
                         "or more text")
    starts = torch.randint(len(tokens) - block_size, (batch,), generator=generator)
    windows = torch.stack([tokens[s:s + block_size + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]
