"""The paper's IRM estimator (Marks et al. 2023), for reproduction beside ours.

Our reading of it: take review sentences, cut each after one word slot, and fill the slot with a
lexicon word or with a neutral word (one the lexicon does not score). The SAE features of the RLHF
model at the filled slot (concatenated over the studied layers), minus those of the neutral
variant, are regressed by ridge on the signed utility distance to the neutral variant
(``U(word) - U(neutral) = U(word)``). Predictions are averaged per word, rescaled linearly to the
lexicon's range, and scored by Kendall tau on held-out words (the same word split as ours).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from irmlens.irm.metrics import kendall_tau, spearman
from irmlens.irm.ridge import fit_ridge, ridge_cv
from sae_training.train import encode_batched


@dataclass
class ContrastiveConfig:
    contexts_per_word: int = 6
    n_neutral: int = 20
    max_prefix_words: int = 20
    cv_folds: int = 5  # of the ridge's alpha choice (the study passes irm.cv_folds)
    seed: int = 0


def neutral_words(
    word_counts: dict[str, int], utility, n: int, near_zero: bool = False
) -> list[str]:
    """The ``n`` most frequent alphabetic words (3+ letters) the lexicon does not score; with
    ``near_zero`` (a lexicon that scores nearly every word, as an RM-free study's implicit
    reward does), the ``n`` of the ``5 n`` most frequent whose utility is nearest 0."""
    ranked = [w for w in sorted(word_counts, key=lambda w: -word_counts[w])]
    ranked = [w for w in ranked if w.isalpha() and len(w) >= 3]
    if near_zero:
        return sorted(ranked[: 5 * n], key=lambda w: abs(utility(w) or 0.0))[:n]
    return [w for w in ranked if utility(w) is None][:n]


def contexts(sentences: list[str], max_prefix_words: int, seed: int = 0) -> list[list[str]]:
    """Sentence prefixes (word lists) ending just before a slot: each cut is at a random position."""
    out = []
    rng = random.Random(seed)
    for s in sentences:
        words = s.split()
        if len(words) < 3:
            continue
        cut = rng.randint(1, min(len(words) - 1, max_prefix_words))
        out.append(words[:cut])
    return out


@torch.no_grad()
def slot_features(model, tokenizer, saes: dict[str, object], texts: list[str], batch_size=64):
    """SAE codes at each text's last token, concatenated over ``saes`` (hook -> SAE)."""
    n_ctx = model.cfg.n_ctx
    # keep the first token (BOS) and the last n_ctx - 1: the slot is the text's last token
    enc = [
        e if len(e) <= n_ctx else e[:1] + e[-(n_ctx - 1) :]
        for e in (tokenizer(t)["input_ids"] for t in texts)
    ]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    feats = []
    stop = max(int(h.split(".")[1]) for h in saes) + 1  # no layer after the last hook is needed
    from tqdm.auto import tqdm

    steps = range(0, len(enc), batch_size)
    # shown when long (irm.paper_contexts_per_word x words): never silent for minutes
    for i in tqdm(steps, desc="contrastive examples", disable=len(steps) < 20, leave=False):
        chunk = enc[i : i + batch_size]
        n = max(len(e) for e in chunk)
        toks = torch.full((len(chunk), n), pad, dtype=torch.long)
        for j, e in enumerate(chunk):
            toks[j, : len(e)] = torch.tensor(e)  # right padding: the causal prefix is unaffected
        last = torch.tensor([len(e) - 1 for e in chunk])
        _, cache = model.run_with_cache(
            toks.to(device), names_filter=list(saes), stop_at_layer=stop
        )
        parts = []
        for hook, sae in saes.items():
            acts = cache[hook][torch.arange(len(chunk)), last.to(device)].float().cpu()
            parts.append(encode_batched(sae, acts))
        feats.append(torch.cat(parts, dim=1))
    return torch.cat(feats)


def paper_estimator(
    model,
    tokenizer,
    saes: dict[str, object],
    sentences: list[str],
    fit_words: list[str],
    heldout_words: list[str],
    utility,
    word_counts: dict[str, int],
    alphas: list[float],
    cfg: ContrastiveConfig,
    neutral_near_zero: bool = False,
) -> dict:
    """Fit on contrastive examples of ``fit_words``, score on ``heldout_words``; see the module doc
    (``neutral_near_zero``: see ``neutral_words``)."""
    rng = random.Random(cfg.seed)
    ctx = contexts(sentences, cfg.max_prefix_words, cfg.seed)
    neutral = neutral_words(word_counts, utility, cfg.n_neutral, neutral_near_zero)
    if not ctx or not neutral:
        raise ValueError("the contrastive estimator needs sentences and neutral words")
    examples = []  # (word, prefix text, neutral text)
    for w in fit_words + heldout_words:
        for prefix in rng.sample(ctx, min(cfg.contexts_per_word, len(ctx))):
            z = rng.choice(neutral)
            examples.append((w, " ".join(prefix + [w]), " ".join(prefix + [z])))
    f_word = slot_features(model, tokenizer, saes, [e[1] for e in examples])
    f_neutral = slot_features(model, tokenizer, saes, [e[2] for e in examples])
    x = f_word - f_neutral
    words = [e[0] for e in examples]
    fit_set = set(fit_words)
    is_fit = torch.tensor([w in fit_set for w in words])
    word_index = {w: i for i, w in enumerate(sorted(set(words)))}
    groups = torch.tensor([word_index[w] for w in words])
    y = torch.tensor([utility(w) for w in words], dtype=torch.float64)
    alpha, cv_r2, _ = ridge_cv(x[is_fit], y[is_fit], groups[is_fit], alphas, cfg.cv_folds, cfg.seed)
    ridge = fit_ridge(x[is_fit], y[is_fit], alpha)
    pred = ridge.predict(x)
    per_word: dict[str, list[float]] = {}
    for w, p in zip(words, pred.tolist(), strict=True):
        per_word.setdefault(w, []).append(p)
    mean = {w: sum(v) / len(v) for w, v in per_word.items()}
    # rescale to the lexicon's range on the fit words (monotone: tau is unchanged)
    fit_pred = torch.tensor([mean[w] for w in fit_words], dtype=torch.float64)
    fit_true = torch.tensor([utility(w) for w in fit_words], dtype=torch.float64)
    span = float(fit_pred.max() - fit_pred.min()) or 1.0
    scale = float(fit_true.max() - fit_true.min()) / span

    def rescaled(w: str) -> float:
        return float(fit_true.min()) + (mean[w] - float(fit_pred.min())) * scale

    held_irm = [rescaled(w) for w in heldout_words]
    held_true = [utility(w) for w in heldout_words]
    return {
        "kendall_tau": kendall_tau(held_irm, held_true),
        "spearman": spearman(held_irm, held_true),
        "cv_r2": cv_r2,
        "alpha": alpha,
        "n_examples": len(examples),
        "n_fit_words": len(fit_words),
        "n_heldout_words": len(heldout_words),
        "neutral_words": neutral,
        "features": f"codes of {len(saes)} SAE(s) at the slot, word minus neutral variant",
        "heldout_points": [
            {"word": w, "true": t, "irm": v}
            for w, t, v in zip(heldout_words, held_true, held_irm, strict=True)
        ],
    }
