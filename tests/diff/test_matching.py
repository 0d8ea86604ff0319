import torch

from irmlens.diff.matching import hungarian_match, mmcs


def test_hungarian_recovers_a_permutation_and_mmcs_is_one():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 8, generator=g)
    perm = torch.randperm(20, generator=g)
    large = torch.cat(
        [w[perm] * 3.0, torch.randn(10, 8, generator=g)]
    )  # scaled, shuffled, plus extras
    r, c, cos = hungarian_match(w, large)
    assert torch.equal(perm[c], r) and torch.allclose(cos, torch.ones(20, dtype=torch.float64))
    assert abs(mmcs(w, large) - 1.0) < 1e-12
    assert abs(mmcs(large, w) - 1.0) < 1e-12  # order of arguments does not matter


def test_one_to_one_is_stricter_than_plain_max():
    # two small features both closest to the same large feature: one-to-one must use another
    small = torch.tensor([[1.0, 0.0], [1.0, 0.1]])
    large = torch.tensor([[1.0, 0.05], [0.0, 1.0]])
    plain_max = (
        torch.nn.functional.normalize(small, dim=1) @ torch.nn.functional.normalize(large, dim=1).T
    )
    assert float(plain_max.max(1).values.mean()) > mmcs(small, large) + 0.3
