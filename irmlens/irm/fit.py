"""Fit the IRM on one split of lexicon words and score it on the other.

Targets: at every position where a word ends, the RM's utility of that word (0 for words the
lexicon does not know). Lexicon words are split into fit and held-out words (fixed seed); ridge is
fitted on positions of fit words plus a sample of non-lexicon positions, and scored by rank
agreement between the IRM's per-word utility (mean prediction over the word's positions) and the
true utility, on held-out words only: fitting and scoring on the same words would let ridge
memorise token identity.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from irmlens.errors import ConfigError
from irmlens.irm.metrics import kendall_tau, spearman
from irmlens.irm.ridge import RidgeCVDesign, RidgeModel, fit_ridge, ridge_cv
from irmlens.irm.spaces import RegisteredSpace
from irmlens.ranges import SEED, SIZE, Each, Int, Real, check_fields, ranged
from irmlens.rewards.lexicon import MIN_CORPUS_LEXICON_WORDS

DEFAULT_ALPHAS = [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0]


@dataclass
class IRMConfig:
    # the share of lexicon words held out for scoring (both sides of the split need words: checked
    # against the corpus before the run, irmlens.checks)
    heldout_fraction: float = ranged(
        0.3,
        Real(0.0, 1.0, lo_open=True, hi_open=True),
        new_run=(
            Real(0.05, 0.95),
            "both sides of the IRM's word split need words (the split itself is checked against "
            "the corpus before the run)",
        ),
    )
    # non-lexicon positions per lexicon position in the fit set
    nonlexicon_ratio: float = ranged(1.0, Real(0.0, 1000.0))
    min_word_count: int = ranged(1, SIZE)  # occurrences a lexicon word needs to be fitted/scored
    alphas: list[float] = ranged(DEFAULT_ALPHAS, Each(Real(0.0, 1e12, lo_open=True)))
    cv_folds: int = ranged(5, Int(2, 100))
    n_shuffles: int = ranged(10, Int(1, 100_000))  # permutations for the shuffled-target control
    # features of the sparse (readable) IRM (at most the widest width: irmlens.checks)
    sparse_k: int = ranged(32, SIZE)
    # feature space of the main IRM: "auto" picks, among the dictionary spaces, the one with the
    # best cross-validated R^2 on the fit words (never the held-out words); or name one
    space: str = ranged("auto", RegisteredSpace())
    # the paper's contrastive estimator: contexts per word
    paper_contexts_per_word: int = ranged(
        6,
        SIZE,
        new_run=(
            Int(1, 64),
            "the paper's estimator runs two forward passes per word and context, and averages a "
            "handful of contexts",
        ),
    )
    seed: int = ranged(0, SEED)

    def __post_init__(self) -> None:
        check_fields(self, "irm")


@dataclass
class PositionTargets:
    """Where words end, which word, and the word's true utility (None: not in the lexicon)."""

    position: torch.Tensor  # indices into the flattened valid positions
    word: torch.Tensor  # word ids
    words: list[str]
    utility: dict[int, float]  # word id -> utility, lexicon words only


def position_targets(
    word_id_valid: torch.Tensor, words: list[str], word_utility: Callable
) -> PositionTargets:
    """``word_id_valid``: word id per valid position (-1 where no word ends), in cache order."""
    pos = torch.nonzero(word_id_valid >= 0).squeeze(-1)
    wid = word_id_valid[pos]
    utility = {}
    for w in torch.unique(wid).tolist():
        u = word_utility(words[w])
        if u is not None:
            utility[w] = float(u)
    return PositionTargets(pos, wid, words, utility)


@dataclass
class Split:
    fit_words: list[int]
    heldout_words: list[int]
    fit_positions: torch.Tensor  # indices into PositionTargets arrays
    heldout_positions: torch.Tensor


def fit_and_heldout_counts(n_words: int, heldout_fraction: float, cv_folds: int):
    """(fit words, held-out words, fit words needed) when ``n_words`` lexicon words are split:
    at least 5 held out, and at least 5 and ``cv_folds`` left to fit (folds of whole words)."""
    n_held = max(5, int(round(heldout_fraction * n_words)))
    return n_words - n_held, n_held, max(5, cv_folds)


def split_words(targets: PositionTargets, cfg: IRMConfig) -> Split:
    counts = torch.bincount(targets.word, minlength=len(targets.words))
    lex = sorted(w for w in targets.utility if counts[w] >= cfg.min_word_count)
    if len(lex) < MIN_CORPUS_LEXICON_WORDS:
        raise ConfigError(
            f"only {len(lex)} lexicon words occur irm.min_word_count = {cfg.min_word_count} "
            f"times or more in the cached tokens; the IRM needs {MIN_CORPUS_LEXICON_WORDS}. "
            "Lower irm.min_word_count, or cache more held-out text (cache.max_rows, "
            "data.n_heldout)"
        )
    n_fit, n_held, need = fit_and_heldout_counts(len(lex), cfg.heldout_fraction, cfg.cv_folds)
    if n_fit < need:
        raise ConfigError(
            f"irm.heldout_fraction = {cfg.heldout_fraction} holds out {n_held} of the {len(lex)} "
            f"lexicon words in the cached tokens, leaving {n_fit} to fit on (it needs {need}): "
            "lower irm.heldout_fraction, or cache more held-out text"
        )
    rng = random.Random(cfg.seed)
    shuffled = lex[:]
    rng.shuffle(shuffled)
    return word_split(targets, sorted(shuffled[n_held:]), sorted(shuffled[:n_held]), cfg, cfg.seed)


def word_split(
    targets: PositionTargets, fit: list[int], held: list[int], cfg: IRMConfig, seed: int
) -> Split:
    """The positions of a given fit/held-out word split: every position of a fit word, plus
    ``cfg.nonlexicon_ratio`` times as many non-lexicon positions drawn under ``seed`` (target 0),
    and every position of a held-out word."""
    is_fit = torch.zeros(len(targets.words), dtype=torch.bool)
    is_fit[fit] = True
    is_held = torch.zeros(len(targets.words), dtype=torch.bool)
    is_held[held] = True
    is_lex = torch.zeros(len(targets.words), dtype=torch.bool)
    is_lex[list(targets.utility)] = True
    fit_lex = torch.nonzero(is_fit[targets.word]).squeeze(-1)
    nonlex = torch.nonzero(~is_lex[targets.word]).squeeze(-1)
    n_non = min(len(nonlex), int(cfg.nonlexicon_ratio * len(fit_lex)))
    gen = torch.Generator().manual_seed(seed)
    nonlex = nonlex[torch.randperm(len(nonlex), generator=gen)[:n_non]]
    fit_pos = torch.sort(torch.cat([fit_lex, nonlex])).values
    held_pos = torch.nonzero(is_held[targets.word]).squeeze(-1)
    return Split(fit, held, fit_pos, held_pos)


def _target_vector(
    targets: PositionTargets, idx: torch.Tensor, utility: dict[int, float]
) -> torch.Tensor:
    return torch.tensor([utility.get(int(w), 0.0) for w in targets.word[idx]], dtype=torch.float64)


def word_means(pred: torch.Tensor, word: torch.Tensor, min_count: int = 1) -> dict[int, float]:
    """Mean of ``pred`` over the positions of each word (words seen fewer than ``min_count`` times dropped)."""
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for p, w in zip(pred.tolist(), word.tolist(), strict=True):
        sums[w] = sums.get(w, 0.0) + p
        counts[w] = counts.get(w, 0) + 1
    return {w: sums[w] / counts[w] for w in sums if counts[w] >= min_count}


@dataclass
class IRMFit:
    model: RidgeModel
    cv_r2: float
    heldout_kendall_tau: float
    heldout_spearman: float
    heldout_irm: dict[int, float]  # word id -> IRM utility
    fit_irm: dict[int, float]


def fit_and_score(
    x_fit: torch.Tensor,
    x_held: torch.Tensor,
    targets: PositionTargets,
    split: Split,
    cfg: IRMConfig,
    utility: dict[int, float] | None = None,
    design: RidgeCVDesign | None = None,
) -> IRMFit:
    """Ridge (alpha by grouped CV) on fit positions, scored on held-out words against the TRUE utilities.

    ``utility`` overrides the fitting targets (the shuffled-target control passes permuted ones);
    scoring always uses ``targets.utility``. ``design``: ``x_fit``'s folds decomposed once
    (:func:`fit_design`), for refits of other targets on the same features.
    """
    fit_utility = targets.utility if utility is None else utility
    y = _target_vector(targets, split.fit_positions, fit_utility)
    groups = targets.word[split.fit_positions]
    alpha, cv_r2, _ = ridge_cv(x_fit, y, groups, cfg.alphas, cfg.cv_folds, cfg.seed, design)
    model = fit_ridge(x_fit, y, alpha) if design is None else design.full.path(y, [alpha])[0]
    held_pred = word_means(model.predict(x_held), targets.word[split.heldout_positions])
    fit_pred = word_means(model.predict(x_fit), groups)
    words = sorted(held_pred)
    irm = [held_pred[w] for w in words]
    true = [targets.utility[w] for w in words]
    return IRMFit(
        model=model,
        cv_r2=cv_r2,
        heldout_kendall_tau=kendall_tau(irm, true),
        heldout_spearman=spearman(irm, true),
        heldout_irm=held_pred,
        fit_irm={w: v for w, v in fit_pred.items() if w in targets.utility},
    )


def fit_design(
    x_fit: torch.Tensor, targets: PositionTargets, split: Split, cfg: IRMConfig
) -> RidgeCVDesign:
    """The folds :func:`fit_and_score` cross-validates ``x_fit`` on, decomposed once."""
    return RidgeCVDesign(x_fit, targets.word[split.fit_positions], cfg.cv_folds, cfg.seed)


def shuffled_utilities(
    targets: PositionTargets, fit_words: list[int], seed: int
) -> dict[int, float]:
    """The fit words' utilities permuted among themselves (held-out words are never touched)."""
    values = [targets.utility[w] for w in fit_words]
    random.Random(seed + 1).shuffle(values)
    return dict(zip(fit_words, values, strict=True))


def shuffled_target_control(
    x_fit: torch.Tensor,
    x_held: torch.Tensor,
    targets: PositionTargets,
    split: Split,
    cfg: IRMConfig,
) -> dict:
    """The whole fit redone on ``cfg.n_shuffles`` permutations of the fit words' utilities.

    One permutation is a noisy null: when the features encode utility, ridge fitted on shuffled
    targets still puts some random-signed weight on them, and rank correlation ignores magnitude,
    so a single shuffle can score |tau| well above 0. The mean and spread over permutations is the
    honest reference.
    """
    taus, rhos, r2s = [], [], []
    design = fit_design(x_fit, targets, split, cfg)  # the features are the same in every refit
    for k in range(cfg.n_shuffles):
        fit = fit_and_score(
            x_fit,
            x_held,
            targets,
            split,
            cfg,
            utility=shuffled_utilities(targets, split.fit_words, cfg.seed + 1000 * k),
            design=design,
        )
        taus.append(fit.heldout_kendall_tau)
        rhos.append(fit.heldout_spearman)
        r2s.append(fit.cv_r2)
    t = torch.tensor(taus, dtype=torch.float64)
    return {
        "heldout_kendall_tau": float(t.mean()),
        "heldout_spearman": float(torch.tensor(rhos, dtype=torch.float64).mean()),
        "cv_r2": float(torch.tensor(r2s, dtype=torch.float64).mean()),
        "heldout_kendall_tau_std": float(t.std()) if len(taus) > 1 else 0.0,
        "heldout_kendall_tau_values": taus,
        "n_shuffles": cfg.n_shuffles,
    }


def top_irm_features(
    model: RidgeModel,
    x_fit: torch.Tensor,
    x_held: torch.Tensor,
    targets: PositionTargets,
    split: Split,
    k: int = 20,
    n_words: int = 5,
    features: list[int] | None = None,
) -> list[dict]:
    """IRM features with the words whose mean feature difference is largest (a first handle on
    what each feature carries). ``features`` gives the ranking (e.g. the sparse IRM's selection
    order), with ``model`` fitted on exactly those columns; otherwise the ``k`` largest
    standardised weights of ``model`` over all columns."""
    if features is None:
        std_all = model.coef * x_fit.double().std(0, unbiased=False)
        features = torch.argsort(std_all.abs(), descending=True)[:k].tolist()
        weights = [float(model.coef[j]) for j in features]
    else:
        weights = [float(w) for w in model.coef[: len(features)]]
    x_all = torch.cat([x_fit, x_held])
    words_all = targets.word[torch.cat([split.fit_positions, split.heldout_positions])]
    out = []
    for j, w in zip(features[:k], weights[:k], strict=False):
        col = x_all[:, j].double()
        means = word_means(col, words_all, min_count=2)
        ranked = sorted(means, key=lambda v: means[v], reverse=True)[:n_words]
        out.append(
            {
                "feature": j,
                "weight": w,
                "standardised_weight": w * float(x_fit[:, j].double().std(unbiased=False)),
                "mean_delta": float(col.mean()),
                "fraction_changed": float((col != 0).double().mean()),
                "top_words": [targets.words[v] for v in ranked],
            }
        )
    return out


def omp_select(x: torch.Tensor, y: torch.Tensor, k: int) -> list[int]:
    """Orthogonal matching pursuit: ``k`` columns of ``x`` chosen greedily (returned in that order),
    each the one most correlated with the residual of least squares on those already chosen.
    Unlike ranking the weights of a full ridge, it does not split credit among correlated
    features."""
    xs = x.double() - x.double().mean(0)
    xs = xs / xs.norm(dim=0).clamp_min(1e-12)
    yc = y.double() - y.double().mean()
    chosen: list[int] = []
    residual = yc.clone()
    for _ in range(min(k, x.shape[1])):
        score = (xs.T @ residual).abs()
        score[chosen] = -1.0
        chosen.append(int(score.argmax()))
        a = xs[:, chosen]
        residual = yc - a @ torch.linalg.lstsq(a, yc[:, None]).solution[:, 0]
    return chosen


def sparse_irm(
    x_fit: torch.Tensor,
    x_held: torch.Tensor,
    targets: PositionTargets,
    split: Split,
    cfg: IRMConfig,
    k: int,
    n_candidates: int | None = None,
) -> tuple[IRMFit, list[int]]:
    """An IRM a person can read: ``k`` features chosen by orthogonal matching pursuit on the fit
    positions (among the first ``n_candidates`` columns, i.e. the dictionary features), then the
    same ridge on those ``k`` alone, scored like every other IRM. Features come back in selection
    order (the first explains the most), and the fit's coefficients follow that order. The
    held-out score is clean (selection saw fit words only); the fit's ``cv_r2`` is optimistic,
    since the selection saw every fit word before the folds were drawn."""
    n_candidates = x_fit.shape[1] if n_candidates is None else n_candidates
    y = _target_vector(targets, split.fit_positions, targets.utility)
    chosen = omp_select(x_fit[:, :n_candidates], y, k)
    fit = fit_and_score(x_fit[:, chosen], x_held[:, chosen], targets, split, cfg)
    return fit, chosen


def irm_feature_weights(
    irm: dict, coef: torch.Tensor, d_sae: int, layer: int | None = None
) -> dict[int, float]:
    """IRM weight per shared-SAE feature of ``layer`` (default: the IRM layer), where the IRM's
    space is built on that dictionary (codes, pre-activations, codes+error, or the multi-layer
    concatenation); empty for a layer the IRM does not read."""
    from irmlens.irm.spaces import SPACES

    spec = SPACES.get(irm["space"])
    layer = irm["layer"] if layer is None else layer
    if spec is None or spec.dictionary != "shared":
        return {}
    if spec.all_layers:
        if layer not in irm["layers"]:
            return {}
        offset = irm["layers"].index(layer) * d_sae
    elif layer != irm["layer"]:
        return {}
    else:
        offset = 0
    return {j: float(coef[offset + j]) for j in range(d_sae)}
