"""Tiny randomly initialised models built from configs (no hub, seconds to build), for tests and smoke runs."""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_byte_tokenizer():
    """A byte-level tokenizer: any unicode round-trips, 256 byte tokens + 3 specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    for special in ("<|im_start|>", "<|im_end|>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>", bos_token="<|im_start|>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _tiny_llama_config(tokenizer, **settings):
    """A two-layer, 32-wide Llama config for ``tokenizer``'s vocabulary; ``settings`` add to it."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        **settings,
    )


def tiny_causal_lm(seed: int = 0, *, varied: bool = False):
    """(model, tokenizer): a tiny random Llama with the byte tokenizer.

    ``varied=True`` unties the head and widens the init so greedy output depends on the prompt (the default
    model repeats its last input token, which cannot show a result reaching the wrong caller).
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    tok = tiny_byte_tokenizer()
    config = _tiny_llama_config(
        tok,
        max_position_embeddings=1024,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        tie_word_embeddings=not varied,
        initializer_range=0.2 if varied else 0.02,  # 0.02 is LlamaConfig's default
    )
    return LlamaForCausalLM(config), tok


def build_tiny_causal_lm(folder: str | Path, seed: int = 0, *, varied: bool = False) -> str:
    """Save :func:`tiny_causal_lm` as a local model folder and return its path."""
    model, tok = tiny_causal_lm(seed, varied=varied)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


WORDS = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] the a an is are what how why write explain give list poem sea tea "
    "green health benefit benefits answer detailed short long good bad yes no please thorough helpful "
    "example examples step steps code python function number one two three four five and or of to in "
    "for with about this that it you i we they be do not can will , . ? ! : ; ' \" ( ) - 0 1 2 3 4 5 6 7 8 9"
).split()


def build_tiny_encoder(folder: str | Path, seed: int = 0) -> str:
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast  # type: ignore[attr-defined]

    torch.manual_seed(seed)
    vocab = {w: i for i, w in enumerate(dict.fromkeys(WORDS))}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    config = BertConfig(  # type: ignore[call-arg]
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=1,
    )
    model = BertForSequenceClassification(config)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return str(folder)


def build_tiny_llama_classifier(folder: str | Path, *, initializer_range: float = 0.02) -> str:
    """A tiny Llama sequence classifier whose tokenizer and config have no pad token (as many decoders ship)."""
    from transformers import LlamaForSequenceClassification

    tokenizer = tiny_byte_tokenizer()
    tokenizer.pad_token = None
    torch.manual_seed(0)
    config = _tiny_llama_config(
        tokenizer,
        num_labels=1,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        initializer_range=initializer_range,
    )
    LlamaForSequenceClassification(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def build_tiny_prompter(root: str | Path) -> tuple[Path, Path]:
    """(prompter folder, base model folder): a tiny Llama base and a LoRA adapter on it with non-zero weights
    (as if trained), saved as a prompter artifact under ``root``. Needs peft (the ``train`` extra)."""
    from peft import LoraConfig, get_peft_model

    from alignpro_plugins.manifest import Manifest, weights_hash
    from alignpro_plugins.prompter import Prompter

    root = Path(root)
    base_dir = Path(build_tiny_causal_lm(root / "base", varied=True))
    lora = get_peft_model(
        tiny_causal_lm(0, varied=True)[0],
        LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    manifest = Manifest(
        base_model=str(base_dir),
        base_model_hash=weights_hash(base_dir),
        similarity_model=None,
        provenance={"stages": [{"stage": "sft", "steps": 3}]},
    )
    prompter = Prompter(lora.eval(), tiny_byte_tokenizer(), manifest, similarity=None)
    folder = prompter.save_pretrained(root / "artifact")
    prompter.close()
    return folder, base_dir
