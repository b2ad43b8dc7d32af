"""The run's vocabulary, of either kind, behind one interface on token lists: words (``vocab.Vocab``) or subwords
(``subword.SubwordVocab``, byte-level BPE).

The rest of the job (batches, decoding, scores, heatmaps) speaks token lists as ``tokenize`` makes them
(``["i'm", "home", "."]``). ``Vocab`` maps each token to one id (a rare one to ``<unk>``). ``SubwordTokens`` maps
the sentence the tokens spell (``detokenize``) to BPE pieces, and decodes pieces back to text and then to tokens,
so no input ever becomes ``<unk>`` and the scores are computed on the same word tokens for both kinds.
``labels(tokens)`` names what each id of ``encode(tokens)`` stands for (the rows and columns of an attention
heatmap): the word itself, or the subword piece.

Saved in the checkpoint's metadata (``to_meta`` / ``from_meta``): a word vocabulary as its list of words (the
format of every earlier checkpoint), a subword one as the ``tokenizers`` JSON object. Nothing is pickled.
"""

from __future__ import annotations

from collections.abc import Iterable

from attnkit.tasks.translate.subword import SubwordVocab
from attnkit.tasks.translate.tokenize import detokenize, tokenize
from attnkit.tasks.translate.vocab import Vocab

KINDS = ("word", "subword")


class SubwordTokens:
    """A subword vocabulary used through token lists: ``encode(tokens) -> ids``, ``decode(ids) -> tokens``."""

    pad_id, bos_id, eos_id, unk_id = Vocab.pad_id, Vocab.bos_id, Vocab.eos_id, Vocab.unk_id

    def __init__(self, subwords: SubwordVocab):
        if not isinstance(subwords, SubwordVocab):
            raise TypeError(f"subwords must be a SubwordVocab; got {type(subwords).__name__}")
        self.subwords = subwords

    @classmethod
    def train(cls, sentences: Iterable[list[str]], *, vocab_size: int, min_frequency: int = 2) -> SubwordTokens:
        """Learn BPE merges from the text of ``sentences`` (token lists of the training split, one side)."""
        texts = [detokenize(s) for s in sentences]
        return cls(SubwordVocab.train(texts, vocab_size=vocab_size, min_frequency=min_frequency))

    def __len__(self) -> int:
        return len(self.subwords)

    def encode(self, tokens: list[str]) -> list[int]:
        """Ids of the pieces of the sentence ``tokens`` spell (never ``<unk>``)."""
        return self.subwords.encode(detokenize(tokens))

    def decode(self, ids: Iterable[int], *, strip: bool = True) -> list[str]:
        """Tokens of the text ``ids`` spell (with ``strip``: up to ``<eos>``, specials dropped)."""
        return tokenize(self.subwords.decode(ids, strip=strip), lowercase=False)

    def labels(self, tokens: list[str]) -> list[str]:
        """What each id of ``encode(tokens)`` stands for: its piece of text."""
        return self.subwords.pieces(self.encode(tokens))

    def labels_of(self, ids: Iterable[int]) -> list[str]:
        return self.subwords.pieces(ids)

    def unknown(self, tokens: list[str]) -> list[str]:
        """Nothing is unknown (an unseen character is spelled by its UTF-8 bytes)."""
        return []

    def to_meta(self) -> dict:
        return self.subwords.to_json()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SubwordTokens) and self.subwords == other.subwords

    def __repr__(self) -> str:
        return f"SubwordTokens(size={len(self)})"


def labels(vocab, tokens: list[str]) -> list[str]:
    """The heatmap labels of ``tokens`` under ``vocab``: one per id of ``vocab.encode(tokens)``."""
    return vocab.labels(tokens) if isinstance(vocab, SubwordTokens) else list(tokens)


def labels_of(vocab, ids: Iterable[int]) -> list[str]:
    """The heatmap labels of generated ``ids`` (a word vocabulary: its words)."""
    return vocab.labels_of(ids) if isinstance(vocab, SubwordTokens) else vocab.decode(ids, strip=False)


def build(kind: str, sentences: list[list[str]], *, min_freq: int, vocab_size: int):
    """The vocabulary of one side of the training split: ``Vocab`` (words seen ``min_freq`` times) or
    ``SubwordTokens`` (``vocab_size`` ids, merges seen at least twice)."""
    if kind == "word":
        return Vocab.build(sentences, min_freq=min_freq)
    if kind == "subword":
        return SubwordTokens.train(sentences, vocab_size=vocab_size)
    raise ValueError(f"vocabulary kind must be one of {KINDS}; got {kind!r}")


def to_meta(vocab) -> list | dict:
    """The JSON form saved in the checkpoint."""
    return vocab.to_meta() if isinstance(vocab, SubwordTokens) else vocab.to_list()


def from_meta(data: object):
    """Rebuild a vocabulary from ``to_meta()`` (a list of words, or a subword JSON object); ValueError names
    what is wrong."""
    if isinstance(data, list):
        return Vocab(data)
    if isinstance(data, dict):
        return SubwordTokens(SubwordVocab.from_json(data))
    raise ValueError(f"a vocabulary must be a JSON list of words or a subword JSON object; got "
                     f"{type(data).__name__}")
