"""The subword vocabulary: nothing becomes <unk>, decoding gives back normal text (French elision and
punctuation, Chinese without spaces), it survives JSON, and a Chinese-English Tatoeba-shaped file (byte-order
mark, three columns) goes through it."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("tokenizers")

from attnkit.tasks.translate.data import load_pairs  # noqa: E402
from attnkit.tasks.translate.subword import SubwordVocab  # noqa: E402

FRENCH = ["Je suis chez moi.", "L'homme n'est pas là !", "Qu'est-ce que c'est ?", "J'ai perdu.",
          "Il est à la maison.", "Nous sommes là.", "C'est l'heure !", "Elle l'a vu."]


@pytest.fixture(scope="module")
def fr():
    return SubwordVocab.train(FRENCH * 3, vocab_size=400, min_frequency=2)


def test_specials_have_the_word_vocabulary_ids(fr):
    assert (fr.pad_id, fr.bos_id, fr.eos_id, fr.unk_id) == (0, 1, 2, 3)
    assert fr.pieces([0, 1, 2, 3]) == ["<pad>", "<bos>", "<eos>", "<unk>"]


@pytest.mark.parametrize("text", ["L'homme n'est pas là !", "Qu'est-ce qu'il a dit ? Rien.",
                                  "zyxw quörk ß Ærøskøbing", "我回家了。", "emoji 🙂 and tab\there"])
def test_nothing_becomes_unk_and_decoding_gives_the_normalized_text_back(fr, text):
    ids = fr.encode(text)
    assert fr.unk_id not in ids and min(ids) >= 4
    assert fr.decode(ids) == fr.normalize(text)
    assert fr.decode([fr.bos_id, *ids, fr.eos_id, 57, 58]) == fr.normalize(text)  # stops at <eos>
    assert len(fr.pieces(ids)) == len(ids)


def test_normalization_folds_tatoeba_spaces_and_the_bom(fr):
    assert fr.normalize("\ufeffJe suis là\u202f!  Oui\u00a0?") == "je suis là ! oui ?"
    cased = SubwordVocab.train(FRENCH, vocab_size=300, min_frequency=1, lowercase=False)
    assert cased.decode(cased.encode("L'Homme")) == "L'Homme"


def test_frequent_words_are_few_pieces_and_rare_ones_are_spelled(fr):
    assert len(fr.encode("l'homme")) < len("l'homme")
    assert len(fr.encode("xylophone")) >= 5


def test_json_round_trip_and_clear_errors(fr):
    data = json.loads(json.dumps(fr.to_json()))
    again = SubwordVocab.from_json(data)
    assert again == fr and again.encode("C'est l'heure !") == fr.encode("C'est l'heure !")
    for bad, field in (({**data, "kind": "word"}, "'kind'"), ({**data, "lowercase": "yes"}, "'lowercase'"),
                       ({**data, "tokenizer": {"model": 3}}, "'tokenizer'"), ([], "'kind'")):
        with pytest.raises(ValueError, match=f"field {field}"):
            SubwordVocab.from_json(bad)


def test_bad_training_options_are_refused_by_name():
    with pytest.raises(ValueError, match="vocab_size must be an int >= 260"):
        SubwordVocab.train(FRENCH, vocab_size=100)
    with pytest.raises(ValueError, match="min_frequency must be an int >= 1"):
        SubwordVocab.train(FRENCH, min_frequency=0)


def test_a_chinese_english_file_with_a_bom_and_three_columns(tmp_path):
    """The shape of a Tatoeba cmn-eng export: UTF-8 with a byte-order mark, source<TAB>target<TAB>attribution,
    Chinese written without spaces. The subword vocabulary learns from the sentences as written and gives them
    back solid (no spaces between characters), even for characters it never saw."""
    rows = [("I'm home.", "我回家了。"), ("I lost.", "我输了。"), ("Go home.", "回家吧。"), ("Who is he?", "他是谁？"),
            ("I am here.", "我在这里。"), ("He is home.", "他在家。")]
    path = tmp_path / "cmn.txt"
    path.write_bytes(("\ufeff" + "".join(f"{en}\t{zh}\tCC-BY 2.0 (France) Attribution: tatoeba.org #{i}\n"
                                         for i, (en, zh) in enumerate(rows))).encode("utf-8"))
    pairs = load_pairs(path)
    assert [p.extra["tgt_text"] for p in pairs] == [zh for _, zh in rows]
    assert pairs[0].extra["src_text"] == "I'm home."  # the byte-order mark is gone
    assert pairs[0].tgt == ["我", "回", "家", "了", "。"]  # the word tokenizer splits CJK per character
    zh = SubwordVocab.train((p.extra["tgt_text"] for p in pairs), vocab_size=300, min_frequency=1)
    en = SubwordVocab.train((p.extra["src_text"] for p in pairs), vocab_size=300, min_frequency=1)
    for p in pairs:
        assert zh.decode(zh.encode(p.extra["tgt_text"])) == p.extra["tgt_text"]
        assert en.decode(en.encode(p.extra["src_text"])) == p.extra["src_text"].lower()
    unseen = "你好，世界！"  # none of these characters is in the file
    ids = zh.encode(unseen)
    assert zh.unk_id not in ids and zh.decode(ids) == zh.normalize(unseen) and " " not in zh.decode(ids)
