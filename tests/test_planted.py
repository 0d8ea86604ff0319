"""Planted truth: a model pair whose difference we wrote ourselves, through the whole pipeline.

The "after" model is the "before" model with a known direction v added to the input embedding of
60 known words, scaled by each word's known utility: the residual stream at every layer carries
``u(w) * v`` wherever such a word appears. The reward model is a lexicon of exactly those
utilities. The pipeline must find v (its top divergent feature and top IRM feature point along v),
recover the utilities of held-out planted words (Spearman >= 0.8), and find no divergent feature
in a null pair (the same model with tiny weight noise).
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch

from irmlens.config import config_from_dict
from irmlens.io import read_json
from irmlens.pipeline import run_study

N_PLANTED = 60


@pytest.fixture(scope="module")
def planted(tmp_path_factory, assets):
    from transformers import GPT2Config, GPT2LMHeadModel

    from irmlens.data.corpus import load_reviews, split_reviews
    from irmlens.models.pretrain import train_tokenizer

    root = tmp_path_factory.mktemp("planted")
    splits = split_reviews(load_reviews(assets.reviews), 20, 40, 0)
    tok = train_tokenizer([r.text for r in splits.train], 1500, kind="word")
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    base = GPT2LMHeadModel(cfg).eval()
    # planted words: frequent alphabetic words of the held-out text (so they appear in the cache)
    counts = Counter(w for r in splits.heldout for w in r.text.split())
    vocab = tok.get_vocab()
    candidates = [w for w, _ in counts.most_common(400) if w.isalpha() and w in vocab]
    rng = random.Random(0)
    words = rng.sample(candidates[20:], N_PLANTED)  # skip the very commonest ("the", "a", ...)
    utilities = {w: rng.choice([-1, 1]) * rng.uniform(0.5, 3.0) for w in words}
    direction = torch.nn.functional.normalize(torch.randn(64), dim=0)
    scale = 3.0 * base.transformer.wte.weight.norm(dim=1).mean()
    after = GPT2LMHeadModel(cfg).eval()
    after.load_state_dict(base.state_dict())
    null = GPT2LMHeadModel(cfg).eval()
    null.load_state_dict(base.state_dict())
    with torch.no_grad():
        for w, u in utilities.items():
            after.transformer.wte.weight[vocab[w]] += scale * u * direction
        g = torch.Generator().manual_seed(1)
        for p in null.parameters():
            p.add_(1e-3 * p.std() * torch.randn(p.shape, generator=g))
    dirs = {}
    for name, model in (("base", base), ("after", after), ("null", null)):
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    lexicon = root / "planted_lexicon.tsv"
    lexicon.write_text("".join(f"{w}\t{u}\n" for w, u in utilities.items()))
    return dirs, lexicon, utilities, direction


@pytest.fixture(scope="module")
def planted_run(planted, tmp_path_factory):
    dirs, lexicon, utilities, direction = planted
    cfg = config_from_dict(
        {
            "name": "planted",
            "data": {"lexicon": str(lexicon), "n_validation": 20, "n_heldout": 40},
            "model": {
                "base": str(dirs["base"]),
                "rlhf": str(dirs["after"]),
                "null": str(dirs["null"]),
            },
            "layers": {"top_k": 1},
            "cache": {"n_ctx": 64, "max_rows": 500},
            "sae": {
                "width_multipliers": [2, 4],
                "batch_size": 256,
                "epochs": 3.0,
                "wide_topk_k": 32,
                "ce_eval_rows": 16,
            },
            "irm": {"n_shuffles": 3, "paper_contexts_per_word": 3},
        }
    )
    out = tmp_path_factory.mktemp("planted_run")
    run_study(cfg, out)
    return out


def _cos_with(direction: torch.Tensor, sae) -> torch.Tensor:
    """|cosine| with v of each feature's encoder direction (what its activation reads) or decoder
    direction (what it writes), whichever is larger."""
    enc = torch.nn.functional.normalize(sae.W_enc.detach().float().T, dim=1) @ direction
    dec = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=1) @ direction
    return torch.maximum(enc.abs(), dec.abs())


def test_pipeline_recovers_planted_utilities_and_features(planted, planted_run):
    from irmlens.study import Study

    _, _, utilities, direction = planted
    study = Study.load(planted_run)
    irm = study.report["irm"]
    # utilities of held-out planted words recovered
    assert irm["heldout_spearman"] >= 0.8, irm["heldout_spearman"]
    held = {p["word"]: p["irm"] for p in irm["heldout_points"]}
    assert len(held) >= 10 and set(held) <= set(utilities)
    # the dictionary found v, and the pipeline ranks the planted feature first
    cos = _cos_with(direction, study.sae())
    top_div = study.report["divergent_features"][0]["feature"]
    assert cos[top_div] >= 0.5, float(cos[top_div])
    if irm["space"] != "sae_codes_error" or irm["top_features"][0]["feature"] < len(cos):
        top_irm = irm["top_features"][0]["feature"]
        assert cos[top_irm] >= 0.5, float(cos[top_irm])
    # the planted change is the only change: the null pair has no divergent feature
    fd = study.report["feature_divergence"]
    assert fd["n_divergent"] >= 1
    assert fd["n_divergent_null"] == 0
    # the null pair's IRM knows nothing of the utilities; the IRM beats it
    assert study.report["controls"]["null_pair"]["difference_ci"][0] > 0


def test_study_tables_are_consistent(planted_run):
    from irmlens.study import Study

    study = Study.load(planted_run)
    features = study.features
    assert len(features) == study.report["feature_divergence"]["n_features"]
    assert features["divergence"].is_monotonic_decreasing
    words = study.words
    assert set(words["split"]) == {"fit", "heldout"}
    assert (words["split"] == "heldout").sum() == study.report["irm"]["n_heldout_words"]
    controls = study.controls
    assert {"shuffled_targets", "random_sae", "base_only", "null_pair"} <= set(controls["name"])
    assert len(study.spaces) >= 5
    report = read_json(planted_run / "report" / "report.json")
    assert report["rlhf"] is None and report["models"]["null"]["path"]
