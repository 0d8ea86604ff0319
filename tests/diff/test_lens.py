"""The activation difference lens: the mean difference over the first tokens, read through the
unembedding, finds a planted direction and scores words by it."""

import pytest
import torch

from irmlens.diff.lens import logit_lens, mean_difference, word_scores


def test_mean_difference_reads_only_each_rows_first_positions():
    valid = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=bool)
    n = int(valid.sum())
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, 8, generator=g)
    u = torch.randn(8, generator=g)
    rank = valid.long().cumsum(1)[valid]
    # the first 3 positions of every row move by u; later ones by something else entirely
    tuned = base + torch.where((rank <= 3)[:, None], u, 10 * torch.randn(n, 8, generator=g))
    assert torch.allclose(mean_difference(base, tuned, valid, first_k=3), u, atol=1e-5)
    assert not torch.allclose(mean_difference(base, tuned, valid, first_k=4), u, atol=1e-2)
    with pytest.raises(ValueError, match="first_k"):
        mean_difference(base, tuned, valid, first_k=0)


def test_logit_lens_finds_the_planted_token_and_scores_words(make_hooked, tiny_hf_dir):
    from transformers import AutoTokenizer

    model = make_hooked(0, d_model=32, d_vocab=300)
    target = 123
    w_u = model.W_U.detach()
    u = 5 * (w_u[:, target] - w_u.mean(1))  # the unembedding's direction for token 123
    logits = logit_lens(model, u)
    assert int(logits.argmax()) == target and abs(float(logits.mean())) < 1e-4
    tok = AutoTokenizer.from_pretrained(tiny_hf_dir)
    words = ["great", "terrible", "movie"]
    scores = word_scores(torch.arange(len(tok), dtype=torch.float), tok, words)
    for w in words:
        assert scores[w] == tok(" " + w, add_special_tokens=False)["input_ids"][0]
