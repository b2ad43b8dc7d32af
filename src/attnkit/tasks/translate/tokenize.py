"""Text <-> tokens for sentence pairs: d2l-style for spaced languages, one token per character for CJK.

``normalize`` folds the spaces Tatoeba uses around French punctuation (U+202F, U+00A0 and other Unicode
spaces) into plain spaces, drops a byte-order mark, optionally lowercases, and puts a space before ``, . ! ?``
(d2l's rule), so ``"I'm home."`` becomes ``"i'm home ."``. ``tokenize`` then splits on spaces, and splits runs
of Chinese/Japanese script (written without spaces) into single characters; ``detokenize`` undoes that, so
``tokenize(detokenize(tokens)) == tokens`` for any tokens ``tokenize`` produced.
"""

from __future__ import annotations

import re

# Scripts written without spaces between words: one token per character.
_CJK_RANGES = (
    (0x3000, 0x303F),  # CJK symbols and punctuation (、。「」)
    (0x3040, 0x309F),  # Hiragana
    (0x30A0, 0x30FF),  # Katakana
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF00, 0xFFEF),  # half/full-width forms (，！？)
    (0x20000, 0x2FA1F),  # CJK extensions B.. and compatibility supplement
)


_CJK_CLASS = "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in _CJK_RANGES)
_CJK_CHAR = re.compile(f"([{_CJK_CLASS}])")
_SPACES = re.compile(r"\s+")  # str patterns match every Unicode space: U+00A0, U+202F, U+3000, ...
_PUNCT = re.compile(r"(?<=\S)([,.!?;:])")  # d2l: a space before punctuation that follows a non-space


def is_cjk(char: str) -> bool:
    """True for a character of a script written without spaces (Han, kana, CJK punctuation)."""
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in _CJK_RANGES)


def normalize(text: str, *, lowercase: bool = True) -> str:
    """Fold Unicode spaces, drop a BOM, optionally lowercase, space out ``, . ! ? ; :`` as d2l does."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    text = _SPACES.sub(" ", text.replace("\ufeff", ""))
    if lowercase:
        text = text.lower()
    return _SPACES.sub(" ", _PUNCT.sub(r" \1", text)).strip()


def tokenize(text: str, *, lowercase: bool = True) -> list[str]:
    """Split a sentence into tokens: words and punctuation marks; CJK characters one by one.

    >>> tokenize("I'm home.")
    ["i'm", 'home', '.']
    >>> tokenize("我回家了。")
    ['我', '回', '家', '了', '。']
    """
    # a CJK character becomes its own word: surround it with spaces, then split on spaces
    return _CJK_CHAR.sub(r" \1 ", normalize(text, lowercase=lowercase)).split()


def detokenize(tokens: list[str]) -> str:
    """Join tokens with spaces, except between two CJK tokens (and a CJK token and its neighbour word).

    Spaced words stay spaced (``"i'm home ."``), CJK runs are written solid (``"我回家了。"``). A space is kept
    between two non-CJK tokens only, which is exactly where ``tokenize`` splits on spaces.
    """
    out = ""
    prev = None
    for tok in tokens:
        if prev is not None and not (is_cjk(prev[-1]) or is_cjk(tok[0])):
            out += " "
        out += tok
        prev = tok
    return out


_SPACE_BEFORE = re.compile(r" ([,.;:!?)\]}»]|\.\.\.)")  # written without a space before them in English


def detokenize_text(tokens: list[str]) -> str:
    """Normal running text from tokens, for standard scores and for people: ``detokenize``, then no space before
    ``, . ; : ! ?`` and closing brackets (``"i'm home ."`` -> ``"i'm home."``). Elisions stay glued as
    ``tokenize`` keeps them (``"l'homme"``); CJK runs are solid (``"我回家了。"``). French typography puts a thin
    space before ``! ? ; :``; standard scorers (sacreBLEU's 13a tokenizer, chrF) ignore that space either way."""
    return _SPACE_BEFORE.sub(r"\1", detokenize(tokens))
