"""Sentence pairs: the embedded date task (gold alignments by construction), a Tatoeba loader, the split.

The embedded task needs no download: English dates such as ``"monday march twenty four"`` go to French
``"lundi vingt quatre mars"`` (or German ``"montag vier und zwanzig märz"``). The month moves behind the day,
and in German the units come before the tens, so attention has to learn a non-monotonic alignment. Because
the pairs are built word by word, the gold source position(s) of every target word are known.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from attnkit.tasks.translate.errors import TranslateError
from attnkit.tasks.translate.tokenize import tokenize

EN_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september",
             "october", "november", "december")
EN_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
MONTH_LENGTHS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
MONTHS = {
    "fr": ("janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août", "septembre", "octobre",
           "novembre", "décembre"),
    "de": ("januar", "februar", "märz", "april", "mai", "juni", "juli", "august", "september", "oktober",
           "november", "dezember"),
}
WEEKDAYS = {
    "fr": ("lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche"),
    "de": ("montag", "dienstag", "mittwoch", "donnerstag", "freitag", "samstag", "sonntag"),
}
LANGS = tuple(MONTHS)


@dataclass
class Pair:
    """One sentence pair.

    ``align[j]`` is the tuple of source positions that target token ``j`` translates (gold alignment), or
    ``None`` when it is not known (real data). ``line`` is the 1-based line in the file it came from; a pair read
    from a file keeps its two sentences as written in ``extra["src_text"]`` / ``extra["tgt_text"]`` (what a
    subword vocabulary learns from).
    """

    src: list[str]
    tgt: list[str]
    align: list[tuple[int, ...]] | None = None
    line: int = 0
    extra: dict = field(default_factory=dict)


def _words(text: str) -> list[str]:
    return text.replace("-", " ").split()


def _day_tokens(n: int, lang: str, src_pos: list[int], en: list[str]) -> tuple[list[str], list[tuple]]:
    """Target tokens of day ``n`` in ``lang`` and, for each, the source positions it translates."""
    from num2words import num2words

    tens, unit = divmod(n, 10)
    if lang == "fr":
        toks = ["premier"] if n == 1 else _words(num2words(n, lang="fr"))
    else:  # German: units before tens, joined by "und" ("vierundzwanzig" -> vier und zwanzig)
        if tens >= 2 and unit:
            unit_word = "ein" if unit == 1 else num2words(unit, lang="de")
            toks = [unit_word, "und", num2words(10 * tens, lang="de")]
        else:
            toks = [num2words(n, lang="de")]
    everything = tuple(src_pos)
    if len(en) == 1:  # "seventeen" -> "dix sept": each target word translates the one source word
        return toks, [everything] * len(toks)
    # en = [tens word, unit word]; map the target words that spell the tens or the unit, the rest to both
    tens_words = {num2words(10 * tens, lang=lang)}
    unit_words = {num2words(unit, lang=lang), "ein"} if lang == "de" else {num2words(unit, lang=lang)}
    align = []
    for tok in toks:
        if tok in tens_words:
            align.append((src_pos[0],))
        elif tok in unit_words:
            align.append((src_pos[1],))
        else:
            align.append(everything)
    return toks, align


def date_pair(month: int, day: int, weekday: int | None, lang: str = "fr") -> Pair:
    """The pair for one date (``month`` 0-11, ``day`` 1-31, ``weekday`` 0-6 or None) with gold alignment."""
    from num2words import num2words

    if lang not in LANGS:
        raise ValueError(f"lang must be one of {LANGS}, got {lang!r}")
    src: list[str] = []
    tgt: list[str] = []
    align: list[tuple[int, ...]] = []
    if weekday is not None:
        src.append(EN_DAYS[weekday])
        tgt.append(WEEKDAYS[lang][weekday])
        align.append((0,))
    month_pos = len(src)
    src.append(EN_MONTHS[month])
    en_day = _words(num2words(day))
    day_pos = list(range(len(src), len(src) + len(en_day)))
    src.extend(en_day)
    toks, day_align = _day_tokens(day, lang, day_pos, en_day)
    tgt.extend(toks)
    align.extend(day_align)
    tgt.append(MONTHS[lang][month])  # the month moves behind the day
    align.append((month_pos,))
    return Pair(src, tgt, align)


def embedded_pairs(lang: str = "fr") -> list[Pair]:
    """Every date of a leap year, with and without each weekday: 366 x 8 = 2,928 distinct pairs."""
    pairs = []
    for month, length in enumerate(MONTH_LENGTHS):
        for day in range(1, length + 1):
            for weekday in (None, *range(7)):
                pairs.append(date_pair(month, day, weekday, lang))
    return pairs


def text_lines(text: str) -> list[str]:
    """Split on line feeds only (and drop a carriage return before one): ``str.splitlines`` would also cut
    at a form feed, a vertical tab or U+2028 inside a sentence."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def load_pairs(path: str | Path, *, lowercase: bool = True, max_pairs: int | None = None) -> list[Pair]:
    """Read ``source<TAB>target[<TAB>attribution]`` lines (Tatoeba / manythings.org format).

    UTF-8 with or without a byte-order mark; blank lines are skipped; Unicode spaces are folded (see
    ``tokenize.normalize``). ``max_pairs`` keeps the first pairs of the file (it is sorted by length).

    Raises:
        TranslateError: the file is missing, not UTF-8, has a line without a tab or with an empty side,
            or holds no pairs; the message names the file and the line.
    """
    path = Path(path)
    if max_pairs is not None and (not isinstance(max_pairs, int) or max_pairs < 1):
        raise ValueError(f"max_pairs must be a positive int or None, got {max_pairs!r}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TranslateError(f"{path}: cannot read the data file ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise TranslateError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); "
                             "expected UTF-8 source<TAB>target lines") from None
    pairs: list[Pair] = []
    for lineno, line in enumerate(text_lines(text), start=1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 2 or len(cols) > 3:
            raise TranslateError(f"{path}:{lineno}: expected source<TAB>target[<TAB>attribution] "
                                 f"(2 or 3 tab-separated columns), got {len(cols)} column(s): {line[:60]!r}")
        src, tgt = tokenize(cols[0], lowercase=lowercase), tokenize(cols[1], lowercase=lowercase)
        if not src or not tgt:
            side = "source" if not src else "target"
            raise TranslateError(f"{path}:{lineno}: the {side} sentence is empty: {line[:60]!r}")
        pairs.append(Pair(src, tgt, None, lineno, {"src_text": cols[0], "tgt_text": cols[1]}))
        if max_pairs is not None and len(pairs) >= max_pairs:
            break
    if not pairs:
        raise TranslateError(f"{path}: no sentence pairs found (the file is empty or blank); "
                             "expected UTF-8 source<TAB>target lines")
    return pairs


def split_pairs(pairs: list[Pair], *, seed: int = 0, valid_frac: float = 0.05,
                test_frac: float = 0.1) -> dict[str, list[Pair]]:
    """Deterministic train / valid / test split that keeps every pair of one source sentence together.

    Tatoeba lists several translations of one English sentence; keeping them in the same part means the
    held-out sentences were never seen in training (and gives multi-reference BLEU for free).
    """
    for name, frac in (("valid_frac", valid_frac), ("test_frac", test_frac)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {frac!r}")
    if valid_frac + test_frac >= 1.0:
        raise ValueError(f"valid_frac + test_frac must be < 1, got {valid_frac + test_frac}")
    groups: dict[tuple[str, ...], list[Pair]] = {}
    for p in pairs:
        groups.setdefault(tuple(p.src), []).append(p)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n_test = round(len(keys) * test_frac)
    n_valid = round(len(keys) * valid_frac)
    parts = {"test": keys[:n_test], "valid": keys[n_test:n_test + n_valid], "train": keys[n_test + n_valid:]}
    return {name: [p for k in ks for p in groups[k]] for name, ks in parts.items()}
