"""Every rule that needs more than one config key, in the order of what it needs.

1. the config alone (``check_study``: several sections; ``StudyConfig.__post_init__`` runs it);
2. a config about to run (``check_new_run``: the work bounds of ``ranged(..., new_run=...)``);
3. the model's dimensions and positions (``check_dimensions``, ``check_positions``: the tiny
   model's from the config at load, a given model's from its config.json before the run);
4. the machine (``check_device_exists``, ``check_reporter_installed``, ``check_memory``);
5. the data (``check_lexicon_fits_corpus``, ``check_study_fits_data``: the corpus and lexicon).

A rule that needs one key sits beside its field (``irmlens.ranges.ranged``); one that needs
several keys of one section in that section's ``__post_init__``. Each error names its key(s) and
the fix. ``irmlens.stages.models.check`` runs 2-5 before a run folder is claimed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from irmlens.errors import ConfigError

if TYPE_CHECKING:
    from irmlens.config import StudyConfig


# ------------------------------------------------------------------ 1. the config alone


MIN_BPE_VOCAB = 300


def check_study(cfg: StudyConfig) -> None:
    """The rules that need more than one section, checked at load (``StudyConfig.__post_init__``)
    so that a config which cannot finish fails before hours of compute, naming the key and the
    fix."""
    space = cfg.irm.space
    if cfg.model.base == "tiny":  # its sizes are here; a given model's: before the run
        p = cfg.pretrain
        check_dimensions(
            cfg,
            p.d_model,
            p.n_layer,
            f"the tiny model (pretrain.n_layer = {p.n_layer}, pretrain.d_model = {p.d_model})",
        )
        if p.tokenizer == "bpe" and p.vocab_size < MIN_BPE_VOCAB:
            raise ValueError(
                f"pretrain.vocab_size = {p.vocab_size} is too small for byte-level BPE (256 "
                f"byte tokens and the special tokens): use {MIN_BPE_VOCAB} or more, or "
                'pretrain.tokenizer = "word"'
            )
    src = cfg.sae.source_info
    if src is not None and src.kind != cfg.cache.hook_kinds[0]:
        raise ValueError(
            f"sae.source reads {src.hook_name} ({src.kind}), but the study's hook kind is "
            f"cache.hook_kinds[0] = {cfg.cache.hook_kinds[0]!r}: put {src.kind!r} first in "
            "cache.hook_kinds"
        )
    if cfg.data.lexicon == "none" and cfg.layers.select == "mediation":
        raise ValueError(
            "layers.select = 'mediation' ranks layers by the reward gain they carry before the "
            "cache, but with data.lexicon = 'none' the reward (the implicit-reward lexicon) is "
            "read off the cache: use layers.select = 'weight_delta', or give a lexicon"
        )
    if cfg.data.lexicon == "none" and not cfg.model.rlhf:
        raise ValueError(
            "data.lexicon = 'none' studies a pair whose reward model is unknown, so irmlens "
            "cannot run RLHF itself: give the tuned model as model.rlhf (a local HF folder or "
            "hub name), or a lexicon as data.lexicon"
        )
    if cfg.null.reward == "zero" and cfg.rlhf.algorithm in ("grpo", "rloo"):
        raise ValueError(
            f"null.reward = 'zero' trains nothing with rlhf.algorithm = "
            f"{cfg.rlhf.algorithm!r} (every advantage is 0): use null.reward = 'shuffled', "
            "or 'none' for no null pair"
        )
    if space != "auto":
        from irmlens.irm.spaces import SPACES

        problem = SPACES[space].unmet(cfg)
        if problem:
            raise ValueError(f"irm.space = {space!r} {problem}, or choose another irm.space")


# ------------------------------------------------------------------ 2. a config about to run


def check_new_run(cfg: StudyConfig) -> None:
    """The rules for a config about to run (not for reading a finished run's config back):
    ``NEW_RUN_LIMITS``, and the tiny model's positions against every sequence the study feeds
    it (a given model's: before the run, from its config.json)."""
    from irmlens.ranges import field_rules

    for key, (rule, why) in field_rules(type(cfg), what="new_run").items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        problem = rule.problem(value)
        if problem:
            raise ConfigError(f"{key} = {value!r} {problem}: {why}")
    if cfg.model.base == "tiny":
        p = cfg.pretrain
        check_positions(cfg, p.n_ctx, f"the tiny model (pretrain.n_ctx = {p.n_ctx})")


# ------------------------------------------------------------ 3. the model's dimensions and positions


def check_dimensions(cfg: StudyConfig, d_model: int, n_layer: int, model: str) -> None:
    """The rules that need the model's width and depth: the tiny model's are in the config
    (checked at load), a given model's are read from its config.json before a run starts."""
    if cfg.layers.top_k > n_layer:
        raise ConfigError(
            f"layers.top_k = {cfg.layers.top_k} but {model} has {n_layer} layers: lower "
            "layers.top_k"
        )
    s = cfg.sae
    widths = sorted({int(m * d_model) for m in s.width_multipliers})
    if widths[0] < 1:
        raise ConfigError(
            f"sae.width_multipliers = {s.width_multipliers} gives a dictionary of width "
            f"{widths[0]} for d_model {d_model} ({model}): use multipliers >= {1 / d_model:.3g}"
        )
    if s.k > widths[0]:  # read by topk and batchtopk; refused for all: it is meaningless
        raise ConfigError(
            f"sae.k = {s.k} exceeds the narrowest dictionary's width {widths[0]} (d_model "
            f"{d_model} x {min(s.width_multipliers):g}, {model}): lower sae.k"
        )
    topk_width = int(s.wide_topk.multiplier * d_model) if s.wide_topk.multiplier else widths[-1]
    if s.wide_topk.k and topk_width < 1:
        raise ConfigError(
            f"sae.wide_topk.multiplier = {s.wide_topk.multiplier} gives a TopK dictionary of width "
            f"{topk_width} for d_model {d_model} ({model}): raise it (0: the widest width)"
        )
    if s.wide_topk.k > topk_width:
        raise ConfigError(
            f"sae.wide_topk.k = {s.wide_topk.k} exceeds the wide TopK dictionary's width "
            f"{topk_width} ({model}): lower sae.wide_topk.k"
        )
    src = s.source_info
    if src is not None:
        if src.d_in != d_model:
            raise ConfigError(
                f"sae.source {src.path} reads {src.d_in}-dimensional activations, but {model} "
                f"has d_model {d_model}: give an SAE trained on this model"
            )
        if src.layer >= n_layer:
            raise ConfigError(
                f"sae.source {src.path} reads {src.hook_name}, but {model} has {n_layer} layers: "
                "give an SAE trained on this model"
            )
        if widths[-1] > src.d_sae:
            raise ConfigError(
                f"sae.width_multipliers = {s.width_multipliers} trains dictionaries of width up "
                f"to {widths[-1]}, wider than sae.source's {src.d_sae} (the study's widest): "
                f"use multipliers <= {src.d_sae / d_model:.4g}"
            )
        widths = sorted({*widths, src.d_sae})
    diff_width = int(s.difference.multiplier * d_model) if s.difference.multiplier else widths[-1]
    if s.difference.k > diff_width:
        raise ConfigError(
            f"sae.difference.k = {s.difference.k} exceeds the difference dictionary's width "
            f"{diff_width} ({model}): lower sae.difference.k or raise sae.difference.multiplier"
        )
    cc_width = int(s.crosscoder.multiplier * d_model) if s.crosscoder.multiplier else widths[-1]
    if s.crosscoder.architecture != "none" and not 1 <= s.crosscoder.k <= cc_width:
        raise ConfigError(
            f"sae.crosscoder.k = {s.crosscoder.k} exceeds the crosscoder's width {cc_width} "
            f"(d_model {d_model}, {model}): lower sae.crosscoder.k or raise "
            "sae.crosscoder.multiplier"
        )
    for key, k in (("irm.sparse_k", cfg.irm.sparse_k),):
        if k > widths[-1]:
            raise ConfigError(
                f"{key} = {k} exceeds the widest dictionary's width {widths[-1]} (d_model "
                f"{d_model} x {max(s.width_multipliers):g}, {model}): lower {key}"
            )


def check_positions(cfg: StudyConfig, n_positions: int, model: str) -> None:
    """Every sequence the study feeds the models fits their positions: the cached rows (and the
    perplexity texts, cut to the same length), RLHF's padded prompts plus completions, and the
    evaluation prompts (at least a token per word and BOS) plus completions."""
    r = cfg.rlhf
    if cfg.cache.n_ctx > n_positions:
        raise ConfigError(
            f"cache.n_ctx = {cfg.cache.n_ctx} but {model} has {n_positions} positions: lower "
            f"cache.n_ctx to {n_positions} or less"
        )
    if not cfg.model.rlhf and r.max_prompt_tokens + r.max_completion_length > n_positions:
        raise ConfigError(
            f"rlhf.max_prompt_tokens + rlhf.max_completion_length = {r.max_prompt_tokens} + "
            f"{r.max_completion_length} exceeds the {n_positions} positions of {model}: lower "
            "them so that prompt and completion fit"
        )
    if r.prompt_max_words + 1 + r.max_completion_length > n_positions:
        raise ConfigError(
            f"rlhf.prompt_max_words = {r.prompt_max_words} (+ BOS) and rlhf.max_completion_length "
            f"= {r.max_completion_length} exceed the {n_positions} positions of {model} (the "
            "evaluation and validation prompts are up to prompt_max_words words): lower them"
        )


# ------------------------------------------------------------------ 4. the machine


def check_device_exists(cfg: StudyConfig) -> None:
    from irmlens.ranges import device_problem

    problem = device_problem(cfg.model.device)
    if problem:
        raise ConfigError(f"model.device = {cfg.model.device!r}: {problem}")


def check_reporter_installed(cfg: StudyConfig) -> None:
    """``rlhf.report_to``'s package is importable (transformers would fail mid-run otherwise)."""
    import importlib.util

    from irmlens.rlhf.train import REPORTERS

    package = REPORTERS[cfg.rlhf.report_to]
    if package is not None and importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"rlhf.report_to = {cfg.rlhf.report_to!r} needs the {package} package, which is not "
            f"installed: pip install {package}, or set rlhf.report_to = 'none'"
        )


def check_memory(cfg, d_model: int) -> None:
    """Refuse sizes whose tensors alone exceed this machine's memory before allocating any: the
    tiny LM's pretraining (weights, gradients, Adam's two moments, logits and activations of a
    batch) and the widest dictionary's training (its weights, gradients and Adam's moments: 32
    bytes per weight; a crosscoder has an encoder and a decoder per model)."""
    from irmlens.allocator import physical_memory
    from irmlens.models.pretrain import pretrain_bytes

    total = physical_memory()
    if total is None:
        return
    if cfg.model.base == "tiny":
        need = pretrain_bytes(cfg.pretrain)
        if need > total:
            p = cfg.pretrain
            raise ConfigError(
                f"pretrain.d_model = {p.d_model}, pretrain.n_ctx = {p.n_ctx}, pretrain.n_layer = "
                f"{p.n_layer}, pretrain.vocab_size = {p.vocab_size} and pretrain.batch_size = "
                f"{p.batch_size} need about {need / 2**30:.1f} GiB to pretrain, more than this "
                f"machine's {total / 2**30:.1f} GiB: lower them"
            )
    s = cfg.sae
    n_models = 3 if cfg.null.reward != "none" or cfg.model.null else 2
    sizes = {
        "sae.width_multipliers": max(s.width_multipliers) * d_model * d_model,
        "sae.wide_topk.multiplier": (s.wide_topk.multiplier or max(s.width_multipliers))
        * d_model
        * d_model,
    }
    if s.crosscoder.architecture != "none":
        cc = (s.crosscoder.multiplier or max(s.width_multipliers)) * d_model
        sizes["sae.crosscoder.multiplier"] = 2 * n_models * cc * d_model
    key, weights = max(sizes.items(), key=lambda kv: kv[1])
    if 32 * weights > total:
        raise ConfigError(
            f"{key}: the widest dictionary over d_model {d_model} has {weights:.3g} weights, "
            f"whose training state takes about {32 * weights / 2**30:.1f} GiB, more than this "
            f"machine's {total / 2**30:.1f} GiB: lower {key}"
        )


# ------------------------------------------------------------------ 5. the data


def check_lexicon_fits_corpus(rm, splits) -> dict:
    """Refuse a lexicon too few of whose words occur in the held-out reviews (the text the IRM is
    fit and scored on); the counts otherwise."""
    from irmlens.rewards.lexicon import check_lexicon_coverage

    return check_lexicon_coverage(rm, [r.text for r in splits.heldout])


def check_study_fits_data(cfg: StudyConfig, rm, splits) -> None:
    """The rules that need the corpus (``rm``: the reward model; None in an RM-free study, whose
    lexicon rules do not apply), each naming its key: prompts can be cut at
    ``rlhf.prompt_max_words``; enough lexicon words occur ``irm.min_word_count`` times for the IRM,
    split by ``irm.heldout_fraction`` with words on both sides; and the tiny LM's word-level
    vocabulary (``pretrain.vocab_size``) holds enough of them. The counts are over all held-out
    reviews, more than the cache holds, so what passes here can still fall short at the IRM
    (which then names the same keys)."""
    from irmlens.data.corpus import longest_sentence
    from irmlens.irm.fit import fit_and_heldout_counts
    from irmlens.rewards.lexicon import MIN_CORPUS_LEXICON_WORDS, lexicon_word_counts

    r = cfg.rlhf
    sources = [("held-out", splits.heldout)]  # the validation stage's prompts
    if not cfg.model.rlhf:  # RLHF's training and evaluation prompts
        sources += [("training", splits.train), ("validation", splits.validation)]
    for label, reviews in sources:
        longest = longest_sentence(reviews)
        if longest <= r.prompt_max_words:
            raise ConfigError(
                f"rlhf.prompt_max_words = {r.prompt_max_words}: prompts are cut from sentences "
                f"longer than that, and the longest sentence of the {label} reviews has {longest} "
                f"words. Lower rlhf.prompt_max_words below {longest}"
            )
    if rm is None:
        return
    counts = lexicon_word_counts(rm, [rv.text for rv in splits.heldout])
    if cfg.model.base == "tiny" and cfg.pretrain.tokenizer == "word":
        from irmlens.models.pretrain import train_tokenizer

        p = cfg.pretrain
        vocab = train_tokenizer([rv.text for rv in splits.train], p.vocab_size, "word").get_vocab()
        known = {w: c for w, c in counts.items() if w in vocab}
        if len(known) < MIN_CORPUS_LEXICON_WORDS:
            raise ConfigError(
                f"pretrain.vocab_size = {p.vocab_size}: the tiny LM's word-level vocabulary (its "
                f"most frequent training words) holds only {len(known)} lexicon words that occur "
                f"in the held-out reviews; the IRM needs {MIN_CORPUS_LEXICON_WORDS}. Raise "
                'pretrain.vocab_size (the default is 4096), or use pretrain.tokenizer = "bpe"'
            )
        counts = known
    i = cfg.irm
    frequent = sorted((c for c in counts.values() if c >= i.min_word_count), reverse=True)
    if len(frequent) < MIN_CORPUS_LEXICON_WORDS:
        top = max(counts.values(), default=0)
        raise ConfigError(
            f"irm.min_word_count = {i.min_word_count}: only {len(frequent)} lexicon words occur "
            f"that often in the held-out reviews (the most frequent, {top} times), and the IRM "
            f"needs {MIN_CORPUS_LEXICON_WORDS}. Lower irm.min_word_count"
        )
    n_fit, n_held, need = fit_and_heldout_counts(len(frequent), i.heldout_fraction, i.cv_folds)
    if n_fit < need:
        raise ConfigError(
            f"irm.heldout_fraction = {i.heldout_fraction} holds out {n_held} of the {len(frequent)} "
            f"lexicon words the held-out reviews offer, leaving {n_fit} to fit the IRM on (it "
            f"needs {need}: irm.cv_folds = {i.cv_folds} folds of whole words). Lower "
            "irm.heldout_fraction"
        )
