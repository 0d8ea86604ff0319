"""The micro study with many keys at the edge of their range (``irmlens.config.RANGES``): a
config that loads must run to a report, not crash in a stage (issue 13)."""

import json
import math
import tomllib
from pathlib import Path

from irmlens.cli import main
from irmlens.config import RANGES

ROOT = Path(__file__).resolve().parents[1]

# [data] and [pretrain] stay the micro study's (its base model is cached); the rest sit on the
# edges: one RLHF step of one-token completions, one-row cache batches and shards, TopK k = 1
# dictionaries a quarter of d_model wide trained for 1% of an epoch, no cards, a 1-feature
# sparse IRM, 2 CV folds, 1 shuffle, no null pair.
EDGES = """
[rlhf]
algorithm = "ppo"
steps = 1
batch_size = 4
mini_batch_size = 1
ppo_epochs = 1
max_completion_length = 1
max_prompt_tokens = 1
kl_coef = 0.001
temperature = 0.01
n_train_prompts = 4
n_eval_prompts = 1
prompt_min_words = 1
prompt_max_words = 1
checkpoint_every = 1
sample_every = 1
logging_steps = 1

[null]
reward = "none"

[layers]
top_k = 1
relative = false

[cache]
n_ctx = 8
max_rows = 300
batch_size = 1
shard_rows = 1
dtype = "int8"

[sae]
width_multipliers = [0.25, 1]
architecture = "topk"
k = 1
batch_size = 1
epochs = 0.01
n_checkpoints = 0
ce_eval_rows = 1

[sae.wide_topk]
k = 1

[diff]
threshold = 0.0
min_frequency = 0.0
matching_threshold = 1.0
top_n = 0
n_cards = 0

[irm]
nonlexicon_ratio = 0.0
cv_folds = 2
n_shuffles = 1
sparse_k = 1
paper_contexts_per_word = 1

[validate]
n_prompts = 2
steering_scales = [0.0]
n_random_draws = 1
n_bootstrap = 10
perplexity_texts = 1
paper_prefix_words = 1
single_feature_prompts = 2

[labels]
min_mass = 1.0
min_utility = 0.0
llm = "none"
n_contexts = 1
"""


def test_the_micro_study_runs_to_a_report_with_keys_at_their_edges(micro_base, tmp_path):
    micro = (ROOT / "tests/micro.toml").read_text()
    text = micro.split("[rlhf]")[0].replace('name = "micro"', 'name = "micro-edges"') + EDGES
    values = tomllib.loads(text)

    def leaves(table: dict, where: str = ""):
        for key, v in table.items():
            yield from leaves(v, f"{where}{key}.") if isinstance(v, dict) else [(where + key, v)]

    for key, v in leaves(values):
        assert RANGES[key].problem(v) is None, key  # all in range
    cfg = tmp_path / "edges.toml"
    cfg.write_text(text)
    out = tmp_path / "run"
    assert main(["run", str(cfg), "--out", str(out)]) == 0
    r = json.loads((out / "report/report.json").read_text())
    assert r["divergent_features"] == []  # top_n = 0
    # n_cards = 0: no card for divergence, only the sparse IRM's features (when on the shared SAE)
    assert all(c["reason"].strip() == "sparse-IRM" for c in r["feature_cards"])
    assert r["irm"]["sparse"]["k"] == 1
    assert math.isfinite(r["irm"]["heldout_kendall_tau"])
    # validate at its edges: one feature per set, one matched draw, steering at scale 0 only,
    # and no divergent-feature set (diff.top_n = 0 lists none)
    v = r["validation"]
    assert {a["n_features"] for a in v["arms"] if a["kind"] != "baseline"} == {1}
    assert "top_divergent" not in v["feature_sets"]
    steer = [a for a in v["arms"] if a["kind"] == "steer"]
    assert steer and all(a["scale"] == 0.0 for a in steer)
    base = next(a for a in v["arms"] if a["arm"] == "base")
    assert all(a["reward"] == base["reward"] for a in steer)  # scale 0 is the identity
    assert {s["width"] for s in r["saes"]} == {16, 64}  # 0.25 and 1 x d_model 64
