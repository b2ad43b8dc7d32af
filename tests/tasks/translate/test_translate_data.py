"""The embedded date task (alignments written out by hand) and the Tatoeba-format loader."""

from __future__ import annotations

import pytest

from attnkit.tasks.translate.data import date_pair, embedded_pairs, load_pairs, split_pairs
from attnkit.tasks.translate.errors import TranslateError

TATOEBA = "/work/shared/data/tatoeba-fra-eng/fra-eng.tsv"


def test_date_pair_french_moves_the_month():
    p = date_pair(2, 24, 0, "fr")  # monday, march 24
    assert p.src == ["monday", "march", "twenty", "four"]
    assert p.tgt == ["lundi", "vingt", "quatre", "mars"]
    assert p.align == [(0,), (2,), (3,), (1,)]


def test_date_pair_german_puts_units_before_tens():
    p = date_pair(2, 24, None, "de")
    assert p.src == ["march", "twenty", "four"]
    assert p.tgt == ["vier", "und", "zwanzig", "märz"]
    assert p.align == [(2,), (1, 2), (1,), (0,)]
    p = date_pair(0, 21, 6, "de")
    assert p.tgt == ["sonntag", "ein", "und", "zwanzig", "januar"]
    assert p.align == [(0,), (3,), (2, 3), (2,), (1,)]


def test_date_pair_single_word_numbers_and_french_specials():
    p = date_pair(11, 17, None, "fr")  # seventeen -> dix sept: both words translate the one word
    assert (p.src, p.tgt, p.align) == (["december", "seventeen"], ["dix", "sept", "décembre"], [(1,), (1,), (0,)])
    p = date_pair(0, 1, None, "fr")
    assert (p.tgt, p.align) == (["premier", "janvier"], [(1,), (0,)])
    p = date_pair(0, 31, None, "fr")  # trente et un: "et" translates the whole number
    assert (p.tgt, p.align) == (["trente", "et", "un", "janvier"], [(1,), (1, 2), (2,), (0,)])
    with pytest.raises(ValueError, match="lang must be one of"):
        date_pair(0, 1, None, "xx")


def test_embedded_task_is_complete_and_deterministic():
    pairs = embedded_pairs("fr")
    assert len(pairs) == 366 * 8
    assert len({tuple(p.src) for p in pairs}) == len(pairs)
    for p in pairs:
        assert len(p.align) == len(p.tgt)
        assert all(0 <= j < len(p.src) for a in p.align for j in a)
    a = split_pairs(pairs, seed=3)
    b = split_pairs(embedded_pairs("fr"), seed=3)
    assert [p.src for p in a["test"]] == [p.src for p in b["test"]]
    assert [p.src for p in split_pairs(pairs, seed=4)["test"]] != [p.src for p in a["test"]]


def test_split_keeps_one_source_in_one_part(tmp_path):
    f = tmp_path / "dup.tsv"
    f.write_text("".join(f"s{i % 50}\tt{i}\n" for i in range(200)), encoding="utf-8")
    parts = split_pairs(load_pairs(f), seed=0, valid_frac=0.2, test_frac=0.2)
    seen = {name: {tuple(p.src) for p in ps} for name, ps in parts.items()}
    assert not (seen["train"] & seen["test"]) and not (seen["train"] & seen["valid"])
    assert not (seen["valid"] & seen["test"])
    assert sum(len(ps) for ps in parts.values()) == 200
    assert len(seen["test"]) == 10 and len(seen["valid"]) == 10
    with pytest.raises(ValueError, match="valid_frac"):
        split_pairs([], valid_frac=1.5)


def test_loader_bom_three_columns_blank_lines_and_spaces(tmp_path):
    f = tmp_path / "pairs.tsv"
    f.write_bytes("\ufeffGo.\tVa\u202f!\tCC-BY 2.0 (France) Attribution: tatoeba.org #2877272\n"
                  "\n   \nI'm home.\tJe suis chez moi.\r\n".encode())
    pairs = load_pairs(f)
    assert [(p.src, p.tgt, p.line) for p in pairs] == [
        (["go", "."], ["va", "!"], 1),
        (["i'm", "home", "."], ["je", "suis", "chez", "moi", "."], 4),
    ]
    assert all(p.align is None for p in pairs)


def test_loader_cjk(tmp_path):
    f = tmp_path / "cmn.tsv"
    f.write_text("I'm home.\t我回家了。\nHello!\t你好！\n", encoding="utf-8")
    pairs = load_pairs(f)
    assert pairs[0].tgt == ["我", "回", "家", "了", "。"]
    assert pairs[1].tgt == ["你", "好", "！"]


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"go .\tva !\nno tab here\n", r"pairs.tsv:2: expected source<TAB>target.*got 1 column"),
        (b"a\tb\tc\td\n", r"pairs.tsv:1: .*got 4 column"),
        (b"a\tb\n\t  \tattr\n", r"pairs.tsv:2: the source sentence is empty"),
        (b"a\t\n", r"pairs.tsv:1: the target sentence is empty"),
        (b"", r"pairs.tsv: no sentence pairs found"),
        (b"\n\n  \n", r"pairs.tsv: no sentence pairs found"),
        (b"ok\tfine\n\xff\xfe\tbad\n", r"pairs.tsv:2: not UTF-8"),
    ],
)
def test_loader_errors_name_file_and_line(tmp_path, content, match):
    f = tmp_path / "pairs.tsv"
    f.write_bytes(content)
    with pytest.raises(TranslateError, match=match):
        load_pairs(f)


def test_loader_missing_file(tmp_path):
    with pytest.raises(TranslateError, match="cannot read the data file"):
        load_pairs(tmp_path / "nope.tsv")


def test_real_tatoeba_file_first_pairs():
    pairs = load_pairs(TATOEBA, max_pairs=300)
    assert len(pairs) == 300
    assert (pairs[0].src, pairs[0].tgt) == (["go", "."], ["va", "!"])
    assert pairs[3].tgt == ["ça", "alors", "!"]  # "Ça alors\u202f!" in the file
    assert all("\u202f" not in t and "\xa0" not in t for p in pairs for t in p.src + p.tgt)
