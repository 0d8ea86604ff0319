"""The per-word IRM table round-trips: what the irm stage writes is what every reader gets."""

from irmlens.irm.words import WORD_UTILITIES, read_word_utilities, word_utilities_text


def test_word_table_round_trip(tmp_path):
    rows = [("good", "fit", 1.9, 0.4123456789, 0.25, 12), ("awful", "heldout", -2.0, -0.5, None, 3)]
    path = tmp_path / WORD_UTILITIES
    path.parent.mkdir(parents=True)
    path.write_text(word_utilities_text(rows), encoding="utf-8")
    got = read_word_utilities(tmp_path)
    assert [r["word"] for r in got] == ["good", "awful"]
    assert got[0]["irm_utility"] == 0.412346 and got[0]["model_implicit_reward"] == 0.25
    assert got[1]["model_implicit_reward"] is None and got[1]["n_positions"] == 3
    assert got[1]["true_utility"] == -2.0 and got[1]["split"] == "heldout"
    assert read_word_utilities(tmp_path / "missing") == []
