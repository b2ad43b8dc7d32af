"""Tokenization: d2l's published preprocessing, Tatoeba's odd spaces, CJK, and round trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from attnkit.tasks.translate.tokenize import detokenize, normalize, tokenize
from attnkit.tasks.translate.vocab import Vocab


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # d2l "Machine translation" section: lowercase, a space before , . ! ? that follows a word
        ("Go.", ["go", "."]),
        ("I lost.", ["i", "lost", "."]),
        ("I'm home.", ["i'm", "home", "."]),
        ("J'ai perdu.", ["j'ai", "perdu", "."]),
        # Tatoeba writes French punctuation after a narrow no-break space (U+202F) or U+00A0
        ("Ça alors\u202f!", ["ça", "alors", "!"]),
        ("Va\u00a0!", ["va", "!"]),
        ("\ufeffWait!", ["wait", "!"]),
        ("Hi,  there .", ["hi", ",", "there", "."]),
        # languages written without spaces: one token per character, punctuation included
        ("我回家了。", ["我", "回", "家", "了", "。"]),
        ("トムは東京に住んでいます。", ["ト", "ム", "は", "東", "京", "に", "住", "ん", "で", "い", "ま", "す", "。"]),
        ("Tom是学生。", ["tom", "是", "学", "生", "。"]),
    ],
)
def test_tokenize_examples(text, expected):
    assert tokenize(text) == expected


def test_normalize_keeps_case_when_asked_and_rejects_non_text():
    assert normalize("Go.", lowercase=False) == "Go ."
    with pytest.raises(TypeError, match="text must be a str"):
        normalize(b"go")


def test_detokenize_writes_cjk_solid_and_words_spaced():
    assert detokenize(["je", "suis", "chez", "moi", "."]) == "je suis chez moi ."
    assert detokenize(["我", "回", "家", "了", "。"]) == "我回家了。"
    assert detokenize(["tom", "是", "学", "生"]) == "tom是学生"


_alphabet = st.sampled_from(list("abcxyz'-é") + [" ", "\u202f", "\u00a0", ".", ",", "!", "?", "我", "家", "の", "。"])


@given(st.text(alphabet=_alphabet, max_size=30))
def test_round_trip(text):
    tokens = tokenize(text)
    assert all(tok and " " not in tok for tok in tokens)
    assert tokenize(detokenize(tokens)) == tokens


def test_vocab_encode_decode_unknown():
    v = Vocab.build([["a", "b", "a"], ["c", "a"]], min_freq=1)
    assert v.itos[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert v.to_list() == ["a", "b", "c"]  # by frequency, then spelling
    assert v.encode(["a", "zz"]) == [4, v.unk_id]
    assert v.decode([v.bos_id, 4, 6, v.eos_id, 5]) == ["a", "c"]
    assert v.unknown(["a", "zz", "q", "zz"]) == ["zz", "q"]
    assert Vocab(v.to_list()) == v
    assert Vocab.build([["a", "b", "a"]], min_freq=2).to_list() == ["a"]
    with pytest.raises(ValueError, match="min_freq"):
        Vocab.build([["a"]], min_freq=0)
    with pytest.raises(ValueError, match="special"):
        Vocab(["<pad>"])
