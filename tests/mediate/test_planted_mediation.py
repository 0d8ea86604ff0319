"""Issue 30, planted truth both ways. (a) A rank-1 shift planted along a known direction at a
known layer: the layer sweep finds it there (and nowhere before), the mean-difference basis fitted
on other rows recovers the direction, and its first component removes the layer's share. (b) A
change planted in two known components of a known dictionary, beside reward-neutral drift of larger
variance: that dictionary removes the site's gain with 2 components, while PCA of the differences
needs more. The instrument must show dictionary value where it exists and none where it does not."""

import copy

import torch

from irmlens.bases.linear import (
    OrthonormalBasis,
    mean_difference_basis,
    pca_of_differences,
    random_orthonormal,
    standard_basis,
)
from irmlens.mediate.curves import Site, faithfulness_curve, model_site
from irmlens.mediate.metrics import RewardMetrics, expected_utility
from irmlens.mediate.sweep import layer_sweep, run_metrics

LAYER = 1


def _planted_pair(make_hooked):
    """A random 3-layer model and a copy whose block-1 MLP writes an extra constant vector v, with
    a utility that rewards the tokens v promotes; tokens split into two halves of rows."""
    base = make_hooked(seed=3, n_layers=3, d_model=16, n_ctx=16, d_vocab=300)
    rlhf = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(16, generator=g)
    v = 3.0 * v / v.norm()
    with torch.no_grad():
        rlhf.blocks[LAYER].mlp.b_out += v
    tokens = torch.randint(0, 300, (48, 16), generator=g)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    with torch.no_grad():
        shift = (rlhf(tokens) - base(tokens)).mean((0, 1))
    utility = (shift - shift.mean()) / shift.std()
    return base, rlhf, v, tokens, mask, utility


def test_a_planted_rank1_shift_is_found_at_its_layer_and_in_one_direction(make_hooked):
    base, rlhf, v, tokens, mask, utility = _planted_pair(make_hooked)
    metrics = RewardMetrics(tokens, mask, utility)
    m_base, m_rlhf = (run_metrics(m, tokens, metrics)["expected_utility"] for m in (base, rlhf))
    assert m_rlhf.mean() > m_base.mean() + 0.1  # the planted shift raised the metric

    sweep = layer_sweep(base, rlhf, tokens, metrics, n_boot=200)["expected_utility"]
    removed = {row["site"]: row["removed"] for row in sweep["sites"]}
    reproduced = {row["site"]: row["reproduced"] for row in sweep["sites"]}
    # nothing before the planted layer carries the gain; from it on, all of it, both ways
    for site in ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"):
        assert abs(removed[site]) < 0.02 and abs(reproduced[site]) < 0.02, (
            site,
            removed,
            reproduced,
        )
    for site in (f"blocks.{LAYER}.hook_resid_post", "blocks.2.hook_resid_post"):
        assert removed[site] > 0.98 and reproduced[site] > 0.98, (site, removed, reproduced)
    assert abs(sweep["final_norm_and_unembedding"]) < 0.02

    hook = f"blocks.{LAYER}.hook_resid_post"
    _, cb = base.run_with_cache(tokens, names_filter=hook)
    _, cr = rlhf.run_with_cache(tokens, names_filter=hook)
    fit, held = slice(0, 24), slice(24, 48)  # fitted bases on rows disjoint from the curve's
    mean_basis = mean_difference_basis(cb[hook][fit], cr[hook][fit])
    pca = pca_of_differences(cb[hook][fit], cr[hook][fit])
    for fitted in (mean_basis, pca):
        assert abs(torch.nn.functional.cosine_similarity(fitted.W_dec[0], v, dim=0)) > 0.95
    held_metric = metrics.rows(held)

    def metric(logits):
        return held_metric(logits)["expected_utility"]

    site = model_site(rlhf, tokens[held], metric, hook, cb[hook][held], cr[hook][held])
    for fitted in (mean_basis, pca):
        curve = faithfulness_curve(fitted, site, removed=True)
        assert curve["curve"][0]["k"] == 1 and curve["curve"][0]["faithfulness"] >= 0.9, curve
        assert curve["k_at_80"] == 1
    # a random rotation spreads the same change over many components
    rand = faithfulness_curve(random_orthonormal(16, seed=1), site, removed=True)
    assert rand["curve"][0]["faithfulness"] < 0.9 and rand["k_at_80"] > 1, rand["curve"]


def _readout(d: int, vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, d, generator=g)
    u = torch.randn(vocab, generator=g)

    def metric(acts: torch.Tensor) -> torch.Tensor:
        logits = acts @ w.T
        return expected_utility(logits, u, torch.ones(acts.shape[:2], dtype=torch.bool))

    null = torch.linalg.svd(w, full_matrices=True).Vh[vocab:]  # directions the readout ignores
    return metric, null


class LinearDictionary:
    """A complete, non-orthogonal dictionary: codes are the exact coordinates in its rows."""

    def __init__(self, decoder: torch.Tensor) -> None:
        self.W_dec = decoder
        self.inverse = torch.linalg.inv(decoder)
        self.cfg = type("Cfg", (), {"d_sae": decoder.shape[0]})()

    def encode(self, x):
        return x @ self.inverse

    def decode(self, codes):
        return codes @ self.W_dec


def test_a_change_in_two_dictionary_features_is_compact_in_that_dictionary_only():
    """The dictionary: two reward-relevant features (0, 1) whose directions also have parts the
    readout ignores, and 30 features spanning directions it ignores or not. RLHF changes
    features 0 and 1 (their coefficients vary by position) and drifts along the ignored features
    with larger, anisotropic variance: the drift is reward-neutral feature by feature. The
    differences' principal directions mix the two with the drift."""
    d, vocab, rows, pos = 32, 8, 64, 8
    metric, null = _readout(d, vocab, seed=5)
    g = torch.Generator().manual_seed(11)
    planted_dirs = torch.nn.functional.normalize(torch.randn(2, d, generator=g), dim=1)
    others = torch.cat([null, torch.randn(d - 2 - len(null), d, generator=g)])
    dictionary = LinearDictionary(torch.cat([planted_dirs, others]))
    base = torch.randn(rows, pos, d, generator=g)
    coef = torch.randn(rows, pos, 2, generator=g) * 1.5  # no consistent sign: no mean shift
    scales = torch.linspace(3.0, 0.5, len(null))
    drift = (torch.randn(rows, pos, len(null), generator=g) * scales) @ null
    rlhf = base + coef @ planted_dirs + drift
    assert abs(metric(rlhf).mean() - metric(base).mean()) > 0.05  # the planted change counts

    fit, held = slice(0, 32), slice(32, 64)  # PCA fitted on rows disjoint from the curve's
    site = Site(base[held], rlhf[held], metric)
    dict_curve = faithfulness_curve(dictionary, site, removed=True)
    pca_curve = faithfulness_curve(pca_of_differences(base[fit], rlhf[fit]), site, removed=True)
    neuron_curve = faithfulness_curve(standard_basis(d), site, removed=True)
    faithful = {c["k"]: c["faithfulness"] for c in dict_curve["curve"]}
    assert faithful[2] >= 0.9, dict_curve["curve"]
    assert sorted(r["component"] for r in dict_curve["ranked"][:2]) == [0, 1]
    pca_faithful = {c["k"]: c["faithfulness"] for c in pca_curve["curve"]}
    assert pca_faithful[2] < 0.9 and pca_curve["k_at_80"] > 2, pca_curve["curve"]
    assert neuron_curve["k_at_80"] > 2, neuron_curve["curve"]
    back = faithfulness_curve(dictionary, site, removed=False)  # sufficiency finds the same two
    assert {c["k"]: c["faithfulness"] for c in back["curve"]}[2] >= 0.9


def test_orthonormal_bases_reconstruct_and_keep_their_error_term():
    x = torch.randn(5, 3, 12)
    for basis in (standard_basis(12), random_orthonormal(12, seed=0)):
        assert torch.allclose(basis.decode(basis.encode(x)), x, atol=1e-5)
    part = OrthonormalBasis(random_orthonormal(12, seed=0).W_dec[:4])
    err = x - part.decode(part.encode(x))
    assert part.encode(err).abs().max() < 1e-5  # the error term is outside its span


class _Tokens:
    """A tokenizer stand-in: token ids read as their own names."""

    def decode(self, ids):
        return f"t{ids[0]}"


def test_the_planted_direction_reads_as_the_tokens_it_rewards(make_hooked):
    """The reward direction read through the output (``read_direction``): the planted v, read
    through the RLHF model's final norm and unembedding, promotes mostly tokens the planted
    utility rewards (the utility was made from the logit shift v causes downstream), and its
    suppressed tokens are ones the utility penalises."""
    from irmlens.mediate.directions import read_direction

    _, rlhf, v, _, _, utility = _planted_pair(make_hooked)
    read = read_direction(rlhf, v, _Tokens(), k=10)
    rewarded = {f"t{i}" for i in utility.topk(30).indices.tolist()}
    penalised = {f"t{i}" for i in (-utility).topk(30).indices.tolist()}
    for way in ("final_norm", "unembedding"):
        assert len(set(read[way]["promoted"]) & rewarded) >= 5, (way, read[way])
        assert len(set(read[way]["suppressed"]) & penalised) >= 5, (way, read[way])
