from types import SimpleNamespace

import pytest

from irmlens.errors import ModelPairError
from irmlens.models.pair import check_pair_configs


def test_pair_with_different_d_model_is_refused():
    a = SimpleNamespace(d_model=64, n_layers=2, d_vocab=100)
    b = SimpleNamespace(d_model=128, n_layers=2, d_vocab=100)
    check_pair_configs(a, a)
    with pytest.raises(ModelPairError, match="d_model.*64 vs 128"):
        check_pair_configs(a, b)
