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


def test_the_study_starts_every_dictionary_from_its_own_weights():
    """Two SAEs from one seed share their start (the narrow decoder is the wide one's first rows):
    MMCS would be 1.0 before any training. The study gives each dictionary its own seed."""
    import sae_lens
    import torch

    from irmlens.stages.saes import sae_init_seed

    def decoder(model, width):
        torch.manual_seed(sae_init_seed(0, model, 1, width))
        cfg = sae_lens.StandardTrainingSAEConfig(d_in=32, d_sae=width)
        return sae_lens.StandardTrainingSAE(cfg).W_dec.detach().double()

    seeds = {
        sae_init_seed(0, m, la, w)
        for m in ("base", "rlhf", "shared")
        for la in (0, 1)
        for w in (64, 128)
    }
    assert len(seeds) == 12
    assert mmcs(decoder("base", 64), decoder("base", 128)) < 0.6
    assert mmcs(decoder("base", 64), decoder("rlhf", 64)) < 0.6
    torch.manual_seed(0)
    same = sae_lens.StandardTrainingSAE(sae_lens.StandardTrainingSAEConfig(d_in=32, d_sae=64))
    torch.manual_seed(0)
    wide = sae_lens.StandardTrainingSAE(sae_lens.StandardTrainingSAEConfig(d_in=32, d_sae=128))
    assert mmcs(same.W_dec.detach().double(), wide.W_dec.detach().double()) > 0.999  # the old way
