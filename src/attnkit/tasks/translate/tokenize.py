"""Text <-> tokens for sentence pairs: d2l-style for spaced languages, one token per character for CJK.

``normalize`` folds the spaces Tatoeba uses around French punctuation (U+202F, U+00A0 and other Unicode
spaces) into plain spaces, drops a byte-order mark, optionally lowercases, and puts a space before ``, . ! ?``
(d2l's rule), so ``"I'm home."`` becomes ``"i'm home ."``. ``tokenize`` then splits on spaces, and splits runs
of Chinese/Japanese script (written without spaces) into single characters; ``detokenize`` undoes that, so
``tokenize(detokenize(tokens)) == tokens`` for any tokens ``tokenize`` produced.
"""

from __future__ import annotations

import re
import unicodedata

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
_PUNCT_BEFORE = set(",.!?;:")


def is_cjk(char: str) -> bool:
    """True for a character of a script written without spaces (Han, kana, CJK punctuation)."""
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in _CJK_RANGES)


def normalize(text: str, *, lowercase: bool = True) -> str:
    """Fold Unicode spaces, drop a BOM, optionally lowercase, space out ``, . ! ? ; :`` as d2l does."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    text = text.replace("\ufeff", "")
    # every Unicode space (U+00A0, U+202F, U+2009, ...) becomes a plain space
    text = "".join(" " if (ch.isspace() or unicodedata.category(ch) == "Zs") else ch for ch in text)
    if lowercase:
        text = text.lower()
    out = []
    for i, ch in enumerate(text):
        # d2l: a space before punctuation that follows a non-space character
        if ch in _PUNCT_BEFORE and i > 0 and text[i - 1] != " ":
            out.append(" ")
        out.append(ch)
    return re.sub(" +", " ", "".join(out)).strip()


def tokenize(text: str, *, lowercase: bool = True) -> list[str]:
    """Split a sentence into tokens: words and punctuation marks; CJK characters one by one.

    >>> tokenize("I'm home.")
    ["i'm", 'home', '.']
    >>> tokenize("我回家了。")
    ['我', '回', '家', '了', '。']
    """
    tokens: list[str] = []
    for word in normalize(text, lowercase=lowercase).split(" "):
        if not word:
            continue
        buf = ""
        for ch in word:
            if is_cjk(ch):
                if buf:
                    tokens.append(buf)
                    buf = ""
                tokens.append(ch)
            else:
                buf += ch
        if buf:
            tokens.append(buf)
    return tokens


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
