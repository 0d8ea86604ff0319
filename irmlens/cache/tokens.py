"""Turn held-out texts into fixed-length token rows, remembering which word each token ends.

Each row starts with BOS; a position carries ``word_id >= 0`` only when its token is the last
token of a whitespace-separated word (so the model has read the whole word there) and no token of
the word is the tokenizer's ``<unk>``. BOS, padding
and word-internal tokens get -1. The word strings go to ``words``; reward models map them to
utilities later, so the cache itself knows nothing about any reward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from irmlens.data.corpus import word_spans


@dataclass
class TokenRows:
    tokens: torch.Tensor  # [n_rows, n_ctx] int64
    valid: torch.Tensor  # [n_rows, n_ctx] bool: real (non-BOS, non-pad) positions
    word_id: torch.Tensor  # [n_rows, n_ctx] int64, -1 where no word ends
    words: list[str]
    # [n_rows, n_ctx] bool: the token is part of a word (False for BOS, pad, punctuation); with
    # word_id it delimits each word's tokens (a word's model-level log-ratio sums over them)
    in_word: torch.Tensor | None = None


def tokenize_rows(
    tokenizer, texts: list[str], n_ctx: int, max_rows: int | None = None
) -> TokenRows:
    if tokenizer.bos_token_id is None:
        raise ValueError("the tokenizer has no BOS token; irmlens starts every cached row with BOS")
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id
    pad = bos if pad is None else pad
    unk = getattr(tokenizer, "unk_token_id", None)
    vocab: dict[str, int] = {}
    rows, words_rows, in_word_rows = [], [], []
    body = n_ctx - 1
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        spans = word_spans(text)
        char_word = [-1] * (len(text) + 1)
        for wi, (s, e) in enumerate(spans):
            for c in range(s, e):
                char_word[c] = wi
        tok_word = [char_word[e - 1] if e > 0 else -1 for (_, e) in offsets]
        unreadable = {w for w, t in zip(tok_word, ids, strict=True) if unk is not None and t == unk}
        # an unreadable word is not part of any word's tokens either (its log-ratio must not be
        # summed into the next word's implicit reward)
        ids_w, in_w = [], [w >= 0 and w not in unreadable for w in tok_word]
        for i, w in enumerate(tok_word):
            # a word the model reads as <unk> ends nowhere: it cannot know that word's utility
            is_last = (
                w >= 0 and w not in unreadable and (i + 1 == len(tok_word) or tok_word[i + 1] != w)
            )
            if is_last:
                word = text[spans[w][0] : spans[w][1]].lower()
                ids_w.append(vocab.setdefault(word, len(vocab)))
            else:
                ids_w.append(-1)
        for start in range(0, len(ids), body):
            rows.append([bos] + ids[start : start + body])
            words_rows.append([-1] + ids_w[start : start + body])
            in_word_rows.append([False] + in_w[start : start + body])
            if max_rows is not None and len(rows) >= max_rows:
                break
        if max_rows is not None and len(rows) >= max_rows:
            break
    n = len(rows)
    tokens = torch.full((n, n_ctx), pad, dtype=torch.long)
    valid = torch.zeros((n, n_ctx), dtype=torch.bool)
    word_id = torch.full((n, n_ctx), -1, dtype=torch.long)
    in_word = torch.zeros((n, n_ctx), dtype=torch.bool)
    for r, (ids, ws, iw) in enumerate(zip(rows, words_rows, in_word_rows, strict=True)):
        tokens[r, : len(ids)] = torch.tensor(ids)
        valid[r, 1 : len(ids)] = True
        word_id[r, : len(ws)] = torch.tensor(ws)
        in_word[r, : len(iw)] = torch.tensor(iw)
    words = [None] * len(vocab)
    for w, i in vocab.items():
        words[i] = w
    return TokenRows(tokens, valid, word_id, words, in_word)
