import shutil

import pytest

from irmlens.data.assets import REVIEWS_FILE, require_assets, verify_assets
from irmlens.data.corpus import load_reviews, review_prompts, split_reviews
from irmlens.errors import MissingAssetError


def test_assets_verified_and_counted(assets):
    assert verify_assets() == []
    reviews = load_reviews(assets.reviews)
    assert len(reviews) == 1500
    assert {r.label for r in reviews} == {1, -1}
    assert sum(r.label == 1 for r in reviews) == 750


def test_missing_asset_error_names_the_fetch_command(tmp_path):
    with pytest.raises(MissingAssetError, match="irmlens data fetch"):
        require_assets(tmp_path)


def test_corrupt_asset_is_detected(assets, tmp_path):
    for p in (assets.reviews, assets.sentences, assets.lexicon):
        shutil.copy(p, tmp_path / p.name)
    assert verify_assets(tmp_path) == []
    with open(tmp_path / REVIEWS_FILE, "a") as f:
        f.write('"1","an extra review"\n')
    problems = verify_assets(tmp_path)
    assert len(problems) == 1 and "checksum" in problems[0]


def test_splits_are_disjoint_and_prompts_bounded(assets):
    reviews = load_reviews(assets.reviews)
    s = split_reviews(reviews, 50, 150, seed=0)
    assert (len(s.train), len(s.validation), len(s.heldout)) == (1300, 50, 150)
    texts = [set(r.text for r in part) for part in (s.train, s.validation, s.heldout)]
    assert not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    prompts = review_prompts(s.train, 200, 2, 10, seed=0)
    assert all(2 <= len(p.split()) <= 10 for p in prompts)
    assert prompts == review_prompts(s.train, 200, 2, 10, seed=0)
