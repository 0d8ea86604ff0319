import pytest

from irmlens.errors import LexiconFormatError
from irmlens.rewards.lexicon import LexiconRewardModel, load_lexicon


def test_known_sentence_reward(tmp_path):
    lex = tmp_path / "lex.tsv"
    lex.write_text("great\t3.1\nbad\t-2.5\n# a comment\n\nboring\t-1.3\n")
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
    from irmlens.rewards.lexicon import ZeroRewardModel

    rm = LexiconRewardModel({f"w{i}": float(i) for i in range(50)})
    sh = rm.shuffled(seed=1)
    assert set(sh.lexicon) == set(rm.lexicon)
    assert sorted(sh.lexicon.values()) == sorted(rm.lexicon.values())
    assert sh.lexicon != rm.lexicon and sh.name.endswith("shuffled")
    assert sh.lexicon == rm.shuffled(seed=1).lexicon  # deterministic
    zero = ZeroRewardModel(rm)
    assert zero.score(["w49 w48", "w3"]) == [0.0, 0.0] and zero.word_utility("w3") == 3.0
