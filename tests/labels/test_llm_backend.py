import torch

from irmlens.labels.llm import HFChatBackend
from irmlens.models.pretrain import train_tokenizer

TEXTS = [
    "the film is great and the acting is superb .",
    "a dull , boring plot with bad dialogue .",
    "i loved the music but hated the ending !",
    "label : positive description : the feature fires on praise",
] * 20
TEMPLATE = "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}<|assistant|>"


def _backend(tmp_path) -> HFChatBackend:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = train_tokenizer(TEXTS, 300, "bpe")
    tok.chat_template = TEMPLATE
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # spread logits (greedy choices far from ties) that hang on the context
        model.lm_head.weight.mul_(40.0)
        for layer in model.model.layers:
            layer.self_attn.v_proj.weight.mul_(30.0)
            layer.self_attn.o_proj.weight.mul_(30.0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    backend = HFChatBackend(tmp_path / "m", max_new_tokens=6)
    backend.model.double()  # float64: the two ways differ only in rounding, never in argmax
    return backend


def _first_logits(backend, **inputs) -> torch.Tensor:
    out = backend.model.generate(
        **inputs,
        max_new_tokens=1,
        do_sample=False,
        pad_token_id=backend.tok.pad_token_id,
        return_dict_in_generate=True,
        output_logits=True,
    )
    return out.logits[0]


def test_the_second_pass_reads_the_prompt_from_the_cache_as_a_full_prompt_would(tmp_path):
    """Prompts of different lengths (left padding) and suffixes of different lengths (padding
    between prompt and suffix): the next-token logits after each prompt + suffix, read through
    the first pass's cache, equal a full pass over that row's text alone (float64)."""
    backend = _backend(tmp_path)
    tok = backend.tok
    heads = [
        "<|user|>the film is great<|assistant|>Label:",
        "<|user|>a dull , boring plot<|assistant|>Label:",
        "<|user|>i<|assistant|>Label:",
    ]
    suffixes = [" positive\nDescription:", "\nDescription:", " un re lated film\nDescription:"]
    enc = tok(heads, return_tensors="pt", padding=True)
    first = backend.model.generate(
        **enc,
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        return_dict_in_generate=True,
    )
    tails = [tok(x, add_special_tokens=False)["input_ids"] for x in suffixes]
    assert len({len(t) for t in tails}) == 3 and len({len(tok(h)["input_ids"]) for h in heads}) == 3
    cached = _first_logits(backend, **backend._after_prompt(enc, first, tails))
    for i, (head, suffix) in enumerate(zip(heads, suffixes, strict=True)):
        alone = tok(head + suffix, return_tensors="pt")
        assert alone["input_ids"][0].tolist() == tok(head)["input_ids"] + tails[i]
        full = _first_logits(backend, **alone)[0]
        torch.testing.assert_close(cached[i], full, rtol=0, atol=1e-9)
        assert full.std() > 1.0  # logits with spread: a misplaced token would show


def test_labels_and_descriptions_are_those_of_two_full_prompts(tmp_path):
    """What the backend answers, against the two full prompts it used to read."""
    backend = _backend(tmp_path)
    prompts = ["the film is great", "a dull , boring plot with bad dialogue and more", "i loved"]
    turns = [
        backend.tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]
    labels = [
        "Label:" + (x.splitlines() or [""])[0].rstrip()
        for x in backend._continue([t + "Label:" for t in turns], 4)
    ]
    described = backend._continue(
        [t + lab + "\nDescription:" for t, lab in zip(turns, labels, strict=True)], 6
    )
    want = [
        f"{lab}\nDescription:{(d.splitlines() or [''])[0].rstrip()}"
        for lab, d in zip(labels, described, strict=True)
    ]
    assert backend._label_then_describe([t + "Label:" for t in turns])[1] is not None
    assert backend.complete(prompts) == want


def test_when_a_suffix_would_not_tokenize_apart_the_second_prompt_is_read_in_full(tmp_path):
    backend = _backend(tmp_path)
    prompts = ["the film is great", "i loved"]
    fast = backend.complete(prompts)
    labels_only = backend._label_then_describe

    def seam_merges(heads):  # as when a BPE merge crosses the prompt/suffix seam
        return labels_only(heads)[0], None

    backend._label_then_describe = seam_merges
    assert backend.complete(prompts) == fast  # float64: both ways give the same tokens
