import hashlib

import pytest

from irmlens.errors import LexiconFormatError
from irmlens.rewards.lexicon import (
    MIN_LEXICON_WORDS,
    VADER_LEXICON_SHA256,
    LexiconRewardModel,
    ZeroRewardModel,
    check_lexicon_coverage,
    load_lexicon,
)

# enough distinct words, with differing utilities, for a lexicon to be accepted
FILLER = "".join(f"filler{i}\t{0.1 * (i + 1):.1f}\n" for i in range(MIN_LEXICON_WORDS))


def test_known_sentence_reward(tmp_path):
    lex = tmp_path / "lex.tsv"
    lex.write_text("great\t3.1\nbad\t-2.5\n# a comment\n\nboring\t-1.3\n" + FILLER)
    rm = LexiconRewardModel.from_file(lex)
    # (3.1 - 1.3) / 5 = 0.36 ; "great," counts as "great"; unknown words count 0
    assert rm.score(["this film is great, but boring"]) == pytest.approx([0.36])
    assert rm.score(["nothing here"]) == [0.0]
    assert rm.word_utility("Great") == pytest.approx(3.1)
    assert rm.word_utility("film") is None


def test_reward_is_clipped():
    rm = LexiconRewardModel({"great": 3.0})
    assert rm.score(["great " * 100]) == [10.0]
    rm_neg = LexiconRewardModel({"bad": -3.0})
    assert rm_neg.score(["bad " * 100]) == [-10.0]


def test_malformed_line_names_its_number(tmp_path):
    lex = tmp_path / "lex.tsv"
    lex.write_text("great\t3.1\nbad -2.5\n")
    with pytest.raises(LexiconFormatError, match="line 2"):
        load_lexicon(lex)
    lex.write_text("great\t3.1\nok\t1.0\nbad\tvery\n")
    with pytest.raises(LexiconFormatError, match="line 3.*not a number"):
        load_lexicon(lex)


def test_vader_lexicon_values(assets):
    rm = LexiconRewardModel.from_file(assets.lexicon)
    # 7,520 entries; 26 of them are case variants (":D"/":d", "LOL"/"lol", ...) of another entry,
    # merged because words are matched lower-case (the reviews are lower-case)
    assert len(rm.lexicon) == 7494
    assert rm.word_utility("great") == pytest.approx(3.1)
    assert rm.word_utility("horrible") == pytest.approx(-2.5)
    assert rm.score(["a great movie"]) == pytest.approx([0.62])


def test_shuffled_and_zero_controls():
    rm = LexiconRewardModel({f"w{i}": float(i) for i in range(50)})
    sh = rm.shuffled(seed=1)
    assert set(sh.lexicon) == set(rm.lexicon)
    assert sorted(sh.lexicon.values()) == sorted(rm.lexicon.values())
    assert sh.lexicon != rm.lexicon and sh.name.endswith("shuffled")
    assert sh.lexicon == rm.shuffled(seed=1).lexicon  # deterministic
    zero = ZeroRewardModel(rm)
    assert zero.score(["w49 w48", "w3"]) == [0.0, 0.0] and zero.word_utility("w3") == 3.0


def test_crlf_extra_columns_and_bom_load(tmp_path):
    lex = tmp_path / "lex.tsv"
    body = "great\t3.1\t0.5\t[3, 3]\r\n# comment\r\n\r\nbad\t-2.5\r\n" + FILLER.replace(
        "\n", "\r\n"
    )
    lex.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    lexicon = load_lexicon(lex)
    assert lexicon["great"] == pytest.approx(3.1) and lexicon["bad"] == pytest.approx(-2.5)
    assert "\ufeffgreat" not in lexicon and len(lexicon) == 2 + MIN_LEXICON_WORDS
    # a BOM before a comment line leaves it a comment
    lex.write_bytes(b"\xef\xbb\xbf# words\n" + FILLER.encode("utf-8"))
    assert len(load_lexicon(lex)) == MIN_LEXICON_WORDS


def test_non_utf8_file_names_file_line_and_encoding(tmp_path):
    lex = tmp_path / "latin1.tsv"
    lex.write_bytes(FILLER.encode("utf-8") + "caf\xe9\t1.0\n".encode("latin-1"))
    with pytest.raises(LexiconFormatError) as e:
        load_lexicon(lex)
    msg = str(e.value)
    assert str(lex) in msg and f"line {MIN_LEXICON_WORDS + 1}" in msg
    assert "must be UTF-8" in msg and "iconv" in msg


def test_duplicate_words_with_different_utilities_name_both_lines(tmp_path):
    lex = tmp_path / "lex.tsv"
    lex.write_text("good\t2.0\n" + FILLER + "Good \t1.5\n")
    with pytest.raises(LexiconFormatError) as e:
        load_lexicon(lex)
    msg = str(e.value)
    assert str(lex) in msg and "'good'" in msg and "given more than once" in msg
    assert f"lines 1 (2) and {MIN_LEXICON_WORDS + 2} (1.5)" in msg and "keep one line" in msg
    lex.write_text("ok\t1\n" + FILLER + "OK\t2\nOk\t3\n")
    with pytest.raises(LexiconFormatError, match=r"'ok' on lines 1 \(1\), 12 \(2\) and 13 \(3\)"):
        load_lexicon(lex)
    # the same utility twice is not ambiguous: merged
    lex.write_text("good\t2.0\n" + FILLER + "GOOD\t2.0\n")
    assert load_lexicon(lex)["good"] == 2.0


def test_too_few_words(tmp_path):
    lex = tmp_path / "one.tsv"
    lex.write_text("great\t3.1\n")
    with pytest.raises(LexiconFormatError, match=r"one\.tsv has only 1 distinct word.*at least 10"):
        load_lexicon(lex)
    # case variants are one word
    lex.write_text(
        "".join(f"{w}\t{i}\n" for i, w in enumerate(["ok"] + list("abcdef"))) + "OK\t0\n"
    )
    with pytest.raises(LexiconFormatError, match="has only 7 distinct word"):
        load_lexicon(lex)
    lex.write_text("")
    with pytest.raises(LexiconFormatError, match="has no entries"):
        load_lexicon(lex)


def test_all_equal_utilities(tmp_path):
    lex = tmp_path / "zeros.tsv"
    lex.write_text("".join(f"w{i}\t0\n" for i in range(20)))
    with pytest.raises(LexiconFormatError, match=r"zeros\.tsv: all 20 utilities are 0.*no signal"):
        load_lexicon(lex)


def test_absurd_utility_names_its_line(tmp_path):
    lex = tmp_path / "huge.tsv"
    lex.write_text(FILLER + "great\t1e308\n")
    with pytest.raises(LexiconFormatError) as e:
        load_lexicon(lex)
    msg = str(e.value)
    assert f"huge.tsv, line {MIN_LEXICON_WORDS + 1}: utility 1e308 is out of range" in msg
    assert "at most 1,000,000" in msg and "rescale" in msg
    lex.write_text(FILLER + "bad\t-2e6\n")
    with pytest.raises(LexiconFormatError, match="out of range"):
        load_lexicon(lex)
    lex.write_text(FILLER + "bad\tinf\n")
    with pytest.raises(LexiconFormatError, match="must be finite"):
        load_lexicon(lex)


def test_shipped_vader_files_load_with_their_duplicates(tmp_path):
    # the exact bytes irmlens.data.assets writes (and vaderSentiment's raw file), no network needed
    from importlib import resources

    from irmlens.data.assets import _vader_lexicon_text

    text = _vader_lexicon_text()
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() in VADER_LEXICON_SHA256
    (tmp_path / "vader_lexicon.tsv").write_bytes(text.encode("utf-8"))
    lexicon = load_lexicon(tmp_path / "vader_lexicon.tsv")
    assert len(lexicon) == 7494 and lexicon["lol"] == 1.8 and lexicon[":p"] == 1.4
    raw = resources.files("vaderSentiment").joinpath("vader_lexicon.txt").read_bytes()
    (tmp_path / "vader_lexicon.txt").write_bytes(raw)
    assert load_lexicon(tmp_path / "vader_lexicon.txt") == lexicon
    # an edited copy is checked like any other lexicon: its conflicting repeats are named
    (tmp_path / "edited.tsv").write_bytes(text.encode("utf-8") + b"irmlens\t1.0\n")
    with pytest.raises(
        LexiconFormatError, match=r"15 word\(s\) given more than once.*'d:' on lines"
    ):
        load_lexicon(tmp_path / "edited.tsv")


def test_coverage_counts_distinct_words_matched_like_word_utility():
    rm = LexiconRewardModel({f"w{i}": float(i) for i in range(20)}, name="toy")
    texts = ["W0, w1 w1 w2! (w3) other", "w4 w5 w6 w7 w8 w9.", "no lexicon words"]
    assert check_lexicon_coverage(rm, texts) == {
        "n_words_in_corpus": 10,
        "n_lexicon_words": 20,
        "n_texts": 3,
        "n_texts_with_lexicon_words": 2,
    }
    # the KL-only null RM and a plain mapping are checked against the same lexicon
    assert check_lexicon_coverage(ZeroRewardModel(rm), texts)["n_words_in_corpus"] == 10
    assert check_lexicon_coverage(rm.lexicon, texts, min_words=3)["n_words_in_corpus"] == 10


def test_coverage_too_few_words_says_how_many_and_the_fix():
    rm = LexiconRewardModel({f"w{i}": float(i) for i in range(20)}, name="toy")
    texts = ["w1 w2 hello", "w2 w3", "bonjour le monde"]
    with pytest.raises(LexiconFormatError) as e:
        check_lexicon_coverage(rm, texts)
    msg = str(e.value)
    assert "only 3 distinct word(s) of lexicon 'toy' (20 words) occur in the 3 texts" in msg
    assert "in 2 of them" in msg and "at least 10" in msg
    assert "language and vocabulary" in msg and "more text" in msg
    with pytest.raises(LexiconFormatError, match="only 0 distinct"):
        check_lexicon_coverage(rm, [])
