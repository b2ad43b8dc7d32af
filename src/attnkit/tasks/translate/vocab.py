"""Tokens <-> integer ids, with the four special tokens every sequence model here needs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


class Vocab:
    """A frozen token list; ids 0..3 are ``<pad> <bos> <eos> <unk>``, the rest by frequency then spelling.

    Args:
        tokens: the ordinary tokens, in id order (specials are added in front).
    """

    def __init__(self, tokens: Iterable[str] = ()):
        tokens = list(tokens)
        clash = [t for t in tokens if t in SPECIALS]
        if clash:
            raise ValueError(f"tokens must not contain the special tokens {SPECIALS}; got {clash[:3]}")
        self.itos: list[str] = list(SPECIALS) + tokens
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("tokens must be unique; got duplicates")

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, sentences: Iterable[list[str]], *, min_freq: int = 1) -> Vocab:
        """Every token seen at least ``min_freq`` times, most frequent first (ties by spelling)."""
        if not isinstance(min_freq, int) or min_freq < 1:
            raise ValueError(f"min_freq must be an int >= 1, got {min_freq!r}")
        counts = Counter(tok for sent in sentences for tok in sent)
        kept = sorted((t for t, c in counts.items() if c >= min_freq and t not in SPECIALS),
                      key=lambda t: (-counts[t], t))
        return cls(kept)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def encode(self, tokens: list[str]) -> list[int]:
        """Ids of ``tokens``; unknown tokens map to ``<unk>``."""
        return [self.stoi.get(t, self.unk_id) for t in tokens]

    def decode(self, ids: Iterable[int], *, strip: bool = True) -> list[str]:
        """Tokens of ``ids``; with ``strip``, stop at ``<eos>`` and drop ``<pad>``/``<bos>``."""
        out = []
        for i in ids:
            i = int(i)
            if strip and i == self.eos_id:
                break
            if strip and i in (self.pad_id, self.bos_id):
                continue
            out.append(self.itos[i])
        return out

    def unknown(self, tokens: list[str]) -> list[str]:
        """The tokens of ``tokens`` that are not in the vocabulary, in order, without repeats."""
        seen: list[str] = []
        for t in tokens:
            if t not in self.stoi and t not in seen:
                seen.append(t)
        return seen

    def to_list(self) -> list[str]:
        """The ordinary tokens (JSON-friendly); ``Vocab(v.to_list())`` rebuilds ``v``."""
        return self.itos[len(SPECIALS):]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)})"
