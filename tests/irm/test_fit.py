import torch

from irmlens.irm.fit import (
    IRMConfig,
    fit_and_score,
    position_targets,
    shuffled_target_control,
    split_words,
    top_irm_features,
)


def _planted(n_words=120, reps=6, d=16, noise=0.3, seed=0):
    """Each word occurrence has features whose first coordinate is the word's utility (plus noise)."""
    g = torch.Generator().manual_seed(seed)
    words = [f"w{i}" for i in range(n_words)] + [f"plain{i}" for i in range(40)]
    utility = {f"w{i}": float(torch.randn(1, generator=g)) * 2 for i in range(n_words)}
    word_ids = torch.arange(len(words)).repeat_interleave(reps)
    word_ids = torch.cat([word_ids, torch.full((30,), -1)])  # positions where no word ends
    feats = torch.randn(len(word_ids), d, generator=g)
    true = torch.tensor([utility.get(words[w], 0.0) if w >= 0 else 0.0 for w in word_ids.tolist()])
    feats[:, 0] = true + noise * torch.randn(len(word_ids), generator=g)
    return word_ids, words, utility, feats


def test_irm_recovers_planted_utilities_on_heldout_words_and_control_does_not():
    word_ids, words, utility, feats = _planted()
    targets = position_targets(word_ids, words, utility.get)
    assert len(targets.utility) == 120 and len(targets.position) == len(word_ids) - 30
    cfg = IRMConfig(heldout_fraction=0.3, seed=0)
    split = split_words(targets, cfg)
    assert not set(split.fit_words) & set(split.heldout_words)
    x = feats[targets.position]
    x_fit, x_held = x[split.fit_positions], x[split.heldout_positions]
    main = fit_and_score(x_fit, x_held, targets, split, cfg)
    assert main.heldout_spearman > 0.9 and main.heldout_kendall_tau > 0.75
    assert main.cv_r2 > 0.5
    control = shuffled_target_control(x_fit, x_held, targets, split, cfg)
    assert len(control["heldout_kendall_tau_values"]) == cfg.n_shuffles
    assert main.heldout_kendall_tau - control["heldout_kendall_tau"] > 0.5
    assert set(main.heldout_irm) == set(split.heldout_words)
    top = top_irm_features(main.model, x_fit, x_held, targets, split, k=3)
    assert top[0]["feature"] == 0 and top[0]["standardised_weight"] > 0  # the planted feature
    best_word = max(utility, key=utility.get)
    assert best_word in top[0]["top_words"][:3]


def test_irm_on_features_without_signal_scores_near_zero():
    word_ids, words, utility, feats = _planted(seed=1)
    feats[:, 0] = torch.randn(len(feats), generator=torch.Generator().manual_seed(5))
    targets = position_targets(word_ids, words, utility.get)
    cfg = IRMConfig(seed=0)
    split = split_words(targets, cfg)
    x = feats[targets.position]
    fit = fit_and_score(x[split.fit_positions], x[split.heldout_positions], targets, split, cfg)
    assert abs(fit.heldout_kendall_tau) < 0.25
    assert fit.cv_r2 < 0.05


def test_bootstrap_ci_covers_tau_and_paired_difference_excludes_zero_only_with_signal():
    from irmlens.irm.metrics import bootstrap_tau_ci, kendall_tau

    g = torch.Generator().manual_seed(0)
    true = {w: float(torch.randn(1, generator=g)) for w in range(200)}
    good = {w: u + 0.5 * float(torch.randn(1, generator=g)) for w, u in true.items()}
    noise = {w: float(torch.randn(1, generator=g)) for w in true}
    tau = kendall_tau([good[w] for w in sorted(true)], [true[w] for w in sorted(true)])
    lo, hi = bootstrap_tau_ci(good, true, n_boot=300)
    assert lo < tau < hi and hi - lo < 0.25
    d_lo, d_hi = bootstrap_tau_ci(good, true, other=noise, n_boot=300)
    assert d_lo > 0.3
    n_lo, n_hi = bootstrap_tau_ci(
        noise, true, other={w: float(torch.randn(1, generator=g)) for w in true}, n_boot=300
    )
    assert n_lo < 0 < n_hi
