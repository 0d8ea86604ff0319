"""The mediation metrics and the comparisons built on them: the implicit reward agrees with stage
target's definition, sweeps find a planted layer by it too, word tokens are masked as target reads
them, paired differences cancel what two curves share, and the reward direction decomposes into a
basis's components."""

import copy

import pytest
import torch

from irmlens.bases.linear import mean_difference_basis, random_orthonormal
from irmlens.irm.implicit import token_log_ratios
from irmlens.mediate.curves import faithfulness_curve, model_site, paired_difference
from irmlens.mediate.directions import decompose, moved_contexts
from irmlens.mediate.metrics import RewardMetrics, word_token_mask
from irmlens.mediate.sweep import layer_sweep, patched_metrics, run_metrics

LAYER = 1


def _pair(make_hooked):
    """A random model and a copy whose block-1 MLP writes a constant extra vector v."""
    base = make_hooked(seed=3, n_layers=3, d_model=16, n_ctx=16, d_vocab=300)
    rlhf = copy.deepcopy(base)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(16, generator=g)
    with torch.no_grad():
        rlhf.blocks[LAYER].mlp.b_out += 3.0 * v / v.norm()
    tokens = torch.randint(0, 300, (32, 16), generator=g)
    scored = torch.rand(tokens.shape, generator=g) < 0.3
    scored[:, 0] = False
    utility = torch.randn(300, generator=g)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    return base, rlhf, v, RewardMetrics(tokens, mask, utility, scored, beta=0.1).with_base(base)


def test_implicit_reward_is_beta_times_the_mean_log_ratio_of_the_scored_tokens(make_hooked):
    base, rlhf, _, metrics = _pair(make_hooked)
    got = run_metrics(rlhf, metrics.tokens, metrics)["implicit_reward"]
    ratio = token_log_ratios(base, rlhf, metrics.tokens)  # stage target's log pi_rlhf/pi_base
    m = metrics.scored.float()
    want = 0.1 * (ratio * m).sum(1) / m.sum(1).clamp_min(1.0)  # a row with none: 0
    assert (got - want).abs().max() < 1e-5, (got - want).abs().max()
    assert run_metrics(base, metrics.tokens, metrics)["implicit_reward"].abs().max() < 1e-6


def test_the_sweep_finds_the_planted_layer_by_both_metrics(make_hooked):
    base, rlhf, _, metrics = _pair(make_hooked)
    sweeps = layer_sweep(base, rlhf, metrics.tokens, metrics, n_boot=100)
    assert set(sweeps) == {"expected_utility", "implicit_reward"}
    for name, sweep in sweeps.items():
        removed = {r["site"]: r["removed"] for r in sweep["sites"]}
        assert abs(removed["blocks.0.hook_resid_post"]) < 0.02, (name, removed)
        assert removed[f"blocks.{LAYER}.hook_resid_post"] > 0.98, (name, removed)
    assert sweeps["implicit_reward"]["base"] == 0.0 or abs(sweeps["implicit_reward"]["base"]) < 1e-6


def test_a_words_tokens_are_the_in_word_run_ending_at_its_end():
    # row: BOS, "un" "believ" "able" (word 7 ends at 3), "film" (word 2 ends at 4), pad
    word_id = torch.tensor([[-1, -1, -1, 7, 2, -1]])
    in_word = torch.tensor([[False, True, True, True, True, False]])
    valid = torch.tensor([[True, True, True, True, True, False]])
    assert word_token_mask(word_id, in_word, valid, {7}).tolist() == [
        [False, True, True, True, False, False]
    ]
    assert word_token_mask(word_id, in_word, valid, {2}).tolist() == [
        [False, False, False, False, True, False]
    ]


def _site_and_fit(make_hooked):
    base, rlhf, v, metrics = _pair(make_hooked)
    hook = f"blocks.{LAYER}.hook_resid_post"
    _, cb = base.run_with_cache(metrics.tokens, names_filter=hook)
    _, cr = rlhf.run_with_cache(metrics.tokens, names_filter=hook)
    fit, held = slice(0, 16), slice(16, 32)
    part = metrics.rows(held)

    def metric(logits):
        return part(logits)["expected_utility"]

    site = model_site(rlhf, part.tokens, metric, hook, cb[hook][held], cr[hook][held])
    return site, cb[hook][fit], cr[hook][fit], v, part.tokens


def test_paired_difference_is_zero_for_a_curve_against_itself_and_finds_the_planted_basis(
    make_hooked,
):
    site, fit_b, fit_r, _, _ = _site_and_fit(make_hooked)
    mean = faithfulness_curve(mean_difference_basis(fit_b, fit_r), site, True, (1, 2, 4, 8))
    rand = faithfulness_curve(random_orthonormal(16, seed=1), site, True, (1, 2, 4, 8))
    same = paired_difference(mean, mean, site, 8, n_boot=200)
    assert same["difference"] == 0.0 and same["ci"] == [0.0, 0.0]
    at_1 = paired_difference(mean, rand, site, 1, n_boot=200)
    assert at_1["difference"] > 0.2 and at_1["ci"][0] > 0, at_1
    area = paired_difference(mean, rand, site, None, n_boot=200)
    assert abs(area["difference"] - (mean["area"] - rand["area"])) < 1e-9
    assert area["ci"][0] <= area["difference"] <= area["ci"][1]


def test_the_mean_difference_decomposes_into_its_own_basis_first_component(make_hooked):
    site, fit_b, fit_r, v, tokens = _site_and_fit(make_hooked)
    direction = (fit_r - fit_b).reshape(-1, 16).mean(0)
    basis = mean_difference_basis(fit_b, fit_r)
    found = decompose(basis, direction, fit_b, fit_r, site, ("mean_difference", LAYER))
    first = found["cumulative"][0]
    assert first["n_features"] == 1 and abs(first["norm_share"] - 1.0) < 1e-4
    assert first["causal_share"] > 0.9, found
    assert found["top"][0]["feature"] == 0 and found["top"][0]["layer"] == LAYER
    # in a random rotation the same direction needs several components
    spread = decompose(random_orthonormal(16, seed=1), direction, fit_b, fit_r, site, ("r", 1))
    assert spread["cumulative"][0]["norm_share"] < 0.8
    assert abs(spread["cumulative"][-1]["norm_share"] - 1.0) < 1e-4  # all 16 write all of it

    class Tok:
        def decode(self, ids):
            return " ".join(f"t{i}" for i in ids)

    contexts = moved_contexts(direction, site.base, site.rlhf, tokens, Tok(), k=3)
    assert len(contexts) == 3
    assert contexts[0]["projection"] >= contexts[1]["projection"] >= contexts[2]["projection"]


def test_a_residual_site_runs_on_from_the_next_block_exactly_as_a_hooked_forward(make_hooked):
    """``model_site`` at ``hook_resid_post`` starts the model at the next block (the blocks
    before cost nothing): the same per-row metric as patching the hook in a whole forward."""
    from irmlens.mediate.sweep import replacing

    base, _, _, metrics = _pair(make_hooked)
    hook = "blocks.1.hook_resid_post"
    _, cache = base.run_with_cache(metrics.tokens, names_filter=hook)
    acts = cache[hook] + 0.3 * torch.randn_like(cache[hook])

    def metric(logits):
        return metrics(logits)["expected_utility"]

    site = model_site(base, metrics.tokens, metric, hook, acts, acts)
    whole = metric(base.run_with_hooks(metrics.tokens, fwd_hooks=[(hook, replacing(acts))]))
    assert (site.metric(acts) - whole).abs().max() < 1e-6
    # the layer sweep's patches run on the same way
    swept = patched_metrics(base, metrics.tokens, metrics, hook, acts)["expected_utility"]
    assert (swept - whole).abs().max() < 1e-6


def test_a_dictionary_of_differences_reads_the_change_itself():
    """``DifferenceBasis``: a dictionary trained on RLHF - base differences encodes the change,
    not each model's activations: a change planted in two of its directions is removed by its
    top 2 components, and its component changes are its codes of the difference."""
    from irmlens.bases.linear import DifferenceBasis
    from irmlens.mediate.curves import Site, component_changes

    g = torch.Generator().manual_seed(4)
    d = 12
    readout, u = torch.randn(6, d, generator=g), torch.randn(6, generator=g)

    def metric(acts):
        from irmlens.mediate.metrics import expected_utility

        return expected_utility(acts @ readout.T, u, torch.ones(acts.shape[:2], dtype=torch.bool))

    decoder = torch.nn.functional.normalize(torch.randn(d, d, generator=g), dim=1)

    class Linear:  # exact coordinates in its rows, as a trained dictionary would approximate
        W_dec = decoder
        cfg = type("Cfg", (), {"d_sae": d})()

        def encode(self, x):
            return x @ torch.linalg.inv(decoder)

        def decode(self, z):
            return z @ decoder

    basis = DifferenceBasis(Linear())
    base = torch.randn(16, 4, d, generator=g) * 3.0
    change = torch.randn(16, 4, 2, generator=g) @ decoder[[3, 7]] + 1.0 * decoder[3]
    rlhf = base + change
    got = component_changes(basis, base, rlhf)
    assert torch.allclose(got, Linear().encode(change), atol=1e-4)
    assert got[..., [0, 1, 2, 4, 5, 6, 8, 9, 10, 11]].abs().max() < 1e-4
    curve = faithfulness_curve(basis, Site(base, rlhf, metric), True, (1, 2, 4))
    assert {c["k"]: c["faithfulness"] for c in curve["curve"]}[2] > 0.99
    assert sorted(r["component"] for r in curve["ranked"][:2]) == [3, 7]


def test_a_crosscoder_reads_the_rlhf_change_along_its_rlhf_decoder_rows():
    """``CrosscoderChangeBasis`` on a hand-set crosscoder over (base, rlhf, null) whose latents
    read the RLHF slot's coordinates and write them back: a latent's change is the coordinate's
    change (the joint code with the RLHF slot given the base's activation subtracted), and the
    change planted in one coordinate is removed by that one latent."""
    from irmlens.bases.linear import CrosscoderChangeBasis
    from irmlens.mediate.curves import Site, component_changes
    from sae_training.crosscoder import Crosscoder, CrosscoderReading

    d = 6
    cc = Crosscoder(3, d, d, architecture="l1")
    with torch.no_grad():
        cc.W_enc[1] = torch.eye(d)  # the RLHF slot's coordinates; the others read nothing
        cc.W_dec[1] = torch.eye(d)
        cc.input_scale.copy_(torch.tensor([1.0, 2.0, 1.0]))  # raw RLHF x2 in its space
    g = torch.Generator().manual_seed(2)
    base = torch.rand(8, 5, d, generator=g) + 1.0  # positive: the ReLU passes them
    rlhf = base.clone()
    rlhf[..., 4] += torch.rand(8, 5, generator=g) + 0.5
    null = torch.rand(8, 5, d, generator=g)
    basis = CrosscoderChangeBasis(CrosscoderReading(cc, ["base", "rlhf", "null"]), {"null": null})
    got = component_changes(basis, base, rlhf)  # codes in the scaled space (x2)
    assert torch.allclose(got, 2.0 * (rlhf - base), atol=1e-5)
    assert torch.allclose(basis.W_dec, torch.eye(d) / 2.0)  # decoder rows back in raw units

    def metric(acts):
        return acts[..., 4].mean(1) - 0.1 * acts[..., 0].mean(1)

    curve = faithfulness_curve(basis, Site(base, rlhf, metric), True, (1, 2))
    assert curve["ranked"][0]["component"] == 4
    assert abs(curve["curve"][0]["share"] - 1.0) < 1e-5


def test_curves_share_the_sites_gradient_and_reuse_the_rechecked_top_patch():
    """The cost the stage's benchmark counts: every basis's curve at a site, one direction, reads
    one gradient of the metric at the start (not one per basis), and its k = 1 patch is the
    re-checked top component's (not run twice); the curve is the same as patching each k."""
    from irmlens.bases.linear import standard_basis
    from irmlens.mediate.curves import Site, set_share

    g = torch.Generator().manual_seed(5)
    d = 8
    readout, u = torch.randn(6, d, generator=g), torch.randn(6, generator=g)
    calls = {"forward": 0, "backward": 0}

    def metric(acts):
        from irmlens.mediate.metrics import expected_utility

        calls["forward"] += 1
        calls["backward"] += acts.requires_grad
        return expected_utility(acts @ readout.T, u, torch.ones(acts.shape[:2], dtype=torch.bool))

    base = torch.randn(10, 3, d, generator=g)
    site = Site(base, base + torch.randn(10, 3, d, generator=g), metric)
    ks, recheck = (1, 2, 4, 8), 3
    bases = [standard_basis(d), random_orthonormal(d, 0), random_orthonormal(d, 1)]
    curves = [faithfulness_curve(b, site, True, ks, recheck) for b in bases]
    # 2 ends + 1 gradient; per basis: recheck single patches, then the ks but k = 1
    assert calls == {"forward": 3 + len(bases) * (recheck + len(ks) - 1), "backward": 1}
    for b, curve in zip(bases, curves, strict=True):
        order = torch.tensor([r["component"] for r in curve["ranked"]])
        for point in curve["curve"]:
            assert point["share"] == pytest.approx(
                set_share(b, site, order[: point["k"]].tolist(), True), abs=1e-6
            )
