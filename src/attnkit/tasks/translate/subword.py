"""A subword vocabulary (byte-level BPE, Hugging Face ``tokenizers``): no input ever becomes ``<unk>``.

The word vocabulary (``vocab.Vocab``) maps every word seen fewer than ``min_freq`` times to ``<unk>``. This one
is learned from the training split's text (``train``): byte-pair merges over UTF-8 bytes, so any text, in any
script, encodes (rare words as several pieces, an unseen character as its bytes) and decodes back to exactly the
normalized text: French elision and punctuation as written (``"l'homme n'est pas là !"``), Chinese without
spaces (``"我回家了。"``). The normalization is NFC, every run of Unicode spaces (the no-break spaces Tatoeba puts
before French punctuation included) to one space, no byte-order mark, and optionally lowercase; full-width
punctuation (``？``) stays as written.

Saved as JSON inside the checkpoint's ``meta.json`` (``to_json`` / ``from_json``; never pickled), so the
checkpoint's checksum covers it. Ids 0..3 are ``<pad> <bos> <eos> <unk>`` as in ``Vocab``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from attnkit.tasks.translate.vocab import SPECIALS

KIND = "bpe-bytelevel"


class SubwordVocab:
    """Byte-level BPE over normalized text; ``encode(text) -> ids``, ``decode(ids) -> text``."""

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, tokenizer, *, lowercase: bool = True):
        self._tok = tokenizer
        self.lowercase = lowercase
        got = [tokenizer.token_to_id(t) for t in SPECIALS]
        if got != [0, 1, 2, 3]:
            raise ValueError(f"the tokenizer's special tokens must be {SPECIALS} with ids 0..3; got ids {got}")

    @classmethod
    def train(cls, texts: Iterable[str], *, vocab_size: int = 8000, min_frequency: int = 2,
              lowercase: bool = True) -> SubwordVocab:
        """Learn merges from ``texts`` (the training split's sentences of one side) up to ``vocab_size`` ids
        (the 256 byte symbols and the 4 specials included)."""
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 260:
            raise ValueError(f"vocab_size must be an int >= 260 (256 bytes + 4 specials); got {vocab_size!r}")
        if isinstance(min_frequency, bool) or not isinstance(min_frequency, int) or min_frequency < 1:
            raise ValueError(f"min_frequency must be an int >= 1; got {min_frequency!r}")
        tok = Tokenizer(models.BPE())
        _configure(tok, lowercase)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIALS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        return cls(tok, lowercase=lowercase)

    def __len__(self) -> int:
        return self._tok.get_vocab_size()

    def normalize(self, text: str) -> str:
        """The text as the vocabulary sees it (and as ``decode`` gives it back)."""
        return self._tok.normalizer.normalize_str(text)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` (never ``<unk>``: an unseen character is spelled by its UTF-8 bytes)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str; got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], *, strip: bool = True) -> str:
        """Text of ``ids``; with ``strip``, stop at ``<eos>`` and drop ``<pad>``/``<bos>``/``<unk>``."""
        out = []
        for i in ids:
            i = int(i)
            if strip and i == self.eos_id:
                break
            if i >= len(SPECIALS):
                out.append(i)
        return self._tok.decode(out, skip_special_tokens=True)

    def pieces(self, ids: Iterable[int]) -> list[str]:
        """One label per id (for heatmaps): the piece's text, or its bytes as ``<e6>`` where it holds part of
        a character."""
        table = _BYTE_OF
        out = []
        for i in ids:
            piece = self._tok.id_to_token(int(i))
            if piece is None or piece in SPECIALS:
                out.append(piece or "?")
                continue
            raw = bytes(table[c] for c in piece)
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.append("".join(f"<{b:02x}>" for b in raw))
        return out

    def unknown(self, text: str) -> list[str]:
        """Nothing is unknown to a byte-level vocabulary (the interface of ``Vocab.unknown``)."""
        return []

    def to_json(self) -> dict:
        """A JSON-able description that ``from_json`` rebuilds exactly."""
        return {"kind": KIND, "lowercase": self.lowercase, "tokenizer": json.loads(self._tok.to_str())}

    @classmethod
    def from_json(cls, data: object) -> SubwordVocab:
        """Rebuild from ``to_json()``; raise ValueError naming the field that is missing or wrong."""
        from tokenizers import Tokenizer

        if not isinstance(data, dict) or data.get("kind") != KIND:
            got = data.get("kind") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"subword vocabulary: field 'kind' must be {KIND!r}; got {got!r}")
        if not isinstance(data.get("lowercase"), bool):
            raise ValueError(f"subword vocabulary: field 'lowercase' must be true or false; got "
                             f"{data.get('lowercase')!r}")
        if not isinstance(data.get("tokenizer"), dict):
            raise ValueError("subword vocabulary: field 'tokenizer' must be a tokenizers JSON object")
        try:
            tok = Tokenizer.from_str(json.dumps(data["tokenizer"]))
        except Exception as exc:  # tokenizers raises its own error type for a malformed description
            raise ValueError(f"subword vocabulary: field 'tokenizer' is not a valid tokenizer ({exc})") from None
        _configure(tok, data["lowercase"])  # the pipeline is ours, whatever the file says
        return cls(tok, lowercase=data["lowercase"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SubwordVocab) and self.to_json() == other.to_json()

    def __repr__(self) -> str:
        return f"SubwordVocab(size={len(self)}, lowercase={self.lowercase})"


def _configure(tok, lowercase: bool) -> None:
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    steps = [normalizers.NFC(), normalizers.Replace("\ufeff", ""), normalizers.Replace(Regex(r"\s+"), " "),
             normalizers.Strip()]
    if lowercase:
        steps.append(normalizers.Lowercase())
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()


def _byte_table() -> dict[str, int]:
    """GPT-2's byte -> printable character map, reversed (the alphabet byte-level BPE pieces are written in)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_OF = _byte_table()
