"""PPO (the paper's algorithm) through trl's ``trl.experimental.ppo`` (trl 1.0-1.12).

trl's PPO wants its reward model as an ``nn.Module`` whose backbone returns ``hidden_states`` and
whose ``score()`` maps them to per-position reward logits. ``LexiconRewardAdapter`` is that module
for a Python reward function: its backbone hands the token ids through, and ``score`` decodes the
completion part and broadcasts the RM's reward to every position (trl reads it at the last token).
All prompts are left-padded to one length, so the completion starts at a known column.

trl's PPO loop has no resume; irmlens runs it in segments of ``checkpoint_every`` updates and
checkpoints policy, value model and optimizer state after each, so an interrupted run restarts
from the last segment.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn


class _PassThroughBackbone(nn.Module):
    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(hidden_states=(input_ids,))


class LexiconRewardAdapter(nn.Module):
    """A Python reward model in the shape trl's PPO expects."""

    base_model_prefix = "backbone"

    def __init__(self, reward_model, tokenizer, context_length: int, recorder=None) -> None:
        super().__init__()
        self.backbone = _PassThroughBackbone()
        self._anchor = nn.Parameter(
            torch.zeros(()), requires_grad=False
        )  # gives the module a device
        self.reward_model = reward_model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.recorder = recorder

    def score(self, token_ids: torch.Tensor) -> torch.Tensor:
        completions = self.tokenizer.batch_decode(
            token_ids[:, self.context_length :], skip_special_tokens=True
        )
        rewards = self.reward_model.score(completions)
        if self.recorder is not None:
            self.recorder.add(completions, rewards)
        r = torch.tensor(rewards, dtype=torch.float32, device=token_ids.device)
        return r[:, None, None].expand(token_ids.shape[0], token_ids.shape[1], 1)


def fixed_length_prompts(
    tokenizer, prompts: list[str], max_tokens: int
) -> tuple[torch.Tensor, int]:
    """Token ids of every prompt, left-padded (or cut from the left) to one common length."""
    ids = [tokenizer(p)["input_ids"][-max_tokens:] for p in prompts]
    length = max(len(x) for x in ids)
    pad = tokenizer.pad_token_id
    out = torch.full((len(ids), length), pad, dtype=torch.long)
    for i, x in enumerate(ids):
        out[i, length - len(x) :] = torch.tensor(x)
    return out, length
