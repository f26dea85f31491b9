"""The tiny model builders: the package's (they live there so examples' --smoke mode can use them), and a tiny
decoder reward model that only tests need."""

from pathlib import Path

from alignpro_plugins.testing import (  # noqa: F401
    CHAT_TEMPLATE,
    build_tiny_causal_lm,
    build_tiny_encoder,
    tiny_byte_tokenizer,
)


def build_tiny_llama_classifier(folder: str | Path, *, initializer_range: float = 0.02) -> str:
    """A tiny Llama sequence classifier whose tokenizer and config have no pad token (as many decoders ship)."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = tiny_byte_tokenizer()
    tokenizer.pad_token = None
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=1,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        initializer_range=initializer_range,
    )
    LlamaForSequenceClassification(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)
