"""A tiny Llama and a character-level tokenizer, built locally (no hub download).

Tests and the default config use it; it is saved with ``save_pretrained`` and loaded with
``from_pretrained`` exactly like a user's model, so the loading code is the real one. A Llama config
(not Qwen2) is used because transformers 5 reloads a Qwen2 tokenizer as ``Qwen2Tokenizer`` and silently
drops spaces and newlines; a Llama one reloads as the fast tokenizer and round-trips exactly.
"""

from __future__ import annotations

import string
from pathlib import Path

SPECIAL = ["<|pad|>", "<|unk|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Printable ASCII without the form feeds; every prompt the configs write is covered.
CHARS = sorted(set(string.printable) - set("\x0b\x0c"))
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer():  # -> PreTrainedTokenizerFast
    """One token per character, plus ChatML specials; left padding for batched generation."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + CHARS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    # Oniguruma rejects "(?s)."; [\s\S] is any character, newlines included.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        eos_token="<|im_end|>",
        bos_token=None,
        padding_side="left",
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|endoftext|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_model(vocab_size: int, hidden: int = 128, layers: int = 4, heads: int = 4, seed: int = 0):
    """A Llama of about a million parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=SPECIAL.index("<|im_end|>"),
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def init_model(out: str | Path, hidden: int = 128, layers: int = 4, heads: int = 4, seed: int = 0) -> Path:
    """Build the tokenizer and model and save both to ``out``; returns ``out``."""
    out = Path(out)
    tok = build_tokenizer()
    model = build_model(len(tok), hidden=hidden, layers=layers, heads=heads, seed=seed)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
