"""`alignpro export`: the merged folder (and GGUF file) gives the adapter's greedy rewrites with plain tools."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alignpro_plugins.chat_template import prompter_chat_template
from alignpro_plugins.engine import GenerationSettings
from alignpro_plugins.export import EXPORT_MANIFEST, export_prompter
from alignpro_plugins.manifest import GenerationDefaults, Manifest, weights_hash
from alignpro_plugins.prompter import Prompter
from alignpro_plugins.testing import build_tiny_causal_lm

PROMPTS = [
    "What are the health benefits of green tea?",
    "Write a poem about the sea.",
    'Explain "quoted" text, {braces} and {% tags %} in one line.',
    "Liste drei Farben auf: rot, grün, blau — und erkläre sie.",
    "why is the sky blue",
]


def save_adapter_prompter(
    folder: Path, base_dir: str, *, mode: str = "augment", max_new_tokens: int = 16, seed: int = 1
) -> Path:
    """A prompter artifact whose LoRA is random (non-zero), so merging it changes the weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(
        base,
        LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    manifest = Manifest(
        base_model=base_dir,
        base_model_hash=weights_hash(base_dir),
        mode=mode,
        generation=GenerationDefaults(max_new_tokens=max_new_tokens),
    )
    Prompter(model, AutoTokenizer.from_pretrained(base_dir), manifest, similarity=None).save_pretrained(
        folder
    )
    return folder


@pytest.fixture(scope="module")
def varied_base(tmp_path_factory) -> str:
    """A tiny model whose greedy output depends on the prompt."""
    return build_tiny_causal_lm(tmp_path_factory.mktemp("varied-base"), varied=True)


def greedy_with_transformers(folder: Path, prompts: list[str]) -> tuple[list[str], list[str]]:
    """(queries, raw generations) from the exported folder with plain transformers and its saved files only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    queries, texts = [], []
    for prompt in prompts:
        query = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        ids = tok(query, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(**ids, pad_token_id=tok.pad_token_id)  # the folder's generation_config
        queries.append(query)
        texts.append(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    return queries, texts


def adapter_outputs(prompter: Prompter, prompts: list[str]) -> tuple[list[str], list[str]]:
    queries = [prompter.format_query(p) for p in prompts]
    settings = GenerationSettings.from_defaults(prompter.manifest.generation)
    return queries, [rows[0].text for rows in prompter.engine.generate(queries, settings)]


@pytest.mark.parametrize("mode", ["augment", "rewrite"])
def test_merged_export_gives_the_adapters_greedy_rewrites(tmp_path, varied_base, mode):
    artifact = save_adapter_prompter(tmp_path / "prompter", varied_base, mode=mode)
    result = export_prompter(artifact, tmp_path / "export")
    assert result.folder == tmp_path / "export" and result.gguf is None
    assert (result.folder / "model.safetensors").is_file()
    assert not (result.folder / "adapter_config.json").exists()  # a standalone model, not an adapter

    adapter = Prompter.from_pretrained(artifact, device="cpu", similarity=None)
    want_queries, want_texts = adapter_outputs(adapter, PROMPTS)
    got_queries, got_texts = greedy_with_transformers(result.folder, PROMPTS)
    assert got_queries == want_queries
    assert got_texts == want_texts
    assert len(set(want_texts)) > 1  # the outputs depend on the prompt: the comparison can fail
    # The LoRA was merged (not dropped): the base model alone answers otherwise.
    base_only = Prompter.from_base(varied_base, mode=mode, device="cpu", similarity=None)
    assert adapter_outputs(base_only, PROMPTS)[1] != want_texts

    info = json.loads((result.folder / EXPORT_MANIFEST).read_text())
    assert info["mode"] == mode and info["manifest"]["has_adapter"] is False
    assert info["source"]["adapter_weights"] == weights_hash(artifact)
    assert Manifest.from_dict(info["manifest"]).instructions == adapter.manifest.instructions


def test_chat_template_rewrites_the_latest_user_message_of_any_conversation(tmp_path, tiny_lm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    manifest = Manifest(base_model=tiny_lm_dir, system_prompt='Say "why" — not {how}.')
    prompter = Prompter.from_base(tiny_lm_dir, device="cpu", similarity=None)
    prompter.manifest = manifest
    tok.chat_template = prompter_chat_template(tok.chat_template, manifest, "augment")
    conversation = [
        {"role": "system", "content": "a system message the prompter never sees"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "the latest question"},
    ]
    rendered = tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert rendered == prompter.format_query("the latest question")
    with pytest.raises(Exception, match="rewrites the latest user message"):
        tok.apply_chat_template([{"role": "system", "content": "x"}], tokenize=False)


def test_chat_template_without_a_base_template_is_the_plain_query_format(tiny_lm_dir):
    from transformers import AutoTokenizer

    prompter = Prompter.from_base(tiny_lm_dir, device="cpu", similarity=None)
    prompter.tokenizer.chat_template = None  # format_query falls back to its plain-text format
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    tok.chat_template = prompter_chat_template(None, prompter.manifest, "augment")
    for prompt in PROMPTS:
        got = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        assert got == prompter.format_query(prompt)


STRICT_TEMPLATE = (  # like Gemma's: no system role
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("system_prompt", ["Be brief.", ""])
def test_a_base_template_without_a_system_role_gets_the_system_prompt_folded_in(
    tmp_path, tiny_lm_dir, system_prompt
):
    from transformers import AutoTokenizer

    prompter = Prompter.from_base(tiny_lm_dir, device="cpu", similarity=None)
    prompter.manifest.system_prompt = system_prompt
    prompter.tokenizer.chat_template = (
        STRICT_TEMPLATE  # format_query folds the system prompt into the user turn
    )
    assert prompter.format_query("hi").startswith(f"<|im_start|>user\n{system_prompt}")
    folder = prompter.save_pretrained(tmp_path / "artifact")
    saved = AutoTokenizer.from_pretrained(str(folder))
    for prompt in PROMPTS:
        got = saved.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        assert got == prompter.format_query(prompt)
    loaded = Prompter.from_pretrained(folder, device="cpu", similarity=None)
    assert [loaded.format_query(p) for p in PROMPTS] == [prompter.format_query(p) for p in PROMPTS]
    loaded.close()
    prompter.close()


def test_a_template_that_does_not_reproduce_the_query_is_refused(tiny_lm_dir):
    from transformers import AutoTokenizer

    from alignpro_plugins.chat_template import check_chat_template

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)  # its own template: the prompt without the instruction
    with pytest.raises(ValueError, match="does not reproduce its query .prompt 'What are"):
        check_chat_template(tok, lambda prompt: f"Improve: {prompt}")


def test_export_refuses_a_used_folder_and_an_unknown_mode_and_leaves_nothing(tmp_path, varied_base):
    artifact = save_adapter_prompter(tmp_path / "prompter", varied_base)
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_prompter(artifact, used)
    assert [p.name for p in used.iterdir()] == ["keep.txt"]
    manifest = Manifest.load(artifact)
    manifest.instructions = {"augment": manifest.instructions["augment"]}
    manifest.save(artifact)
    with pytest.raises(ValueError, match="mode 'rewrite' cannot be exported.*augment"):
        export_prompter(artifact, tmp_path / "new", mode="rewrite")
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompter", "used"]  # no temporary folder left


def test_export_command(tmp_path, varied_base, capsys):
    from alignpro_plugins.cli import main

    artifact = save_adapter_prompter(tmp_path / "prompter", varied_base)
    assert main(["export", str(artifact), "--out", str(tmp_path / "export")]) == 0
    assert (tmp_path / "export" / "model.safetensors").is_file()
    assert str(tmp_path / "export") in capsys.readouterr().out
    assert main(["export", str(artifact), "--out", str(tmp_path / "export")]) == 2
    assert "not an empty folder" in capsys.readouterr().err


@pytest.mark.real_models
def test_gguf_export_carries_the_template_and_gives_the_same_greedy_rewrites(tmp_path, smollm2_dir):
    """llama.cpp's converter on a small Llama with SmolLM2's tokenizer (a known pre-tokenizer for llama.cpp)."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    base = tmp_path / "base"
    LlamaForCausalLM(config).save_pretrained(str(base))
    tok.save_pretrained(str(base))
    artifact = save_adapter_prompter(tmp_path / "prompter", str(base), max_new_tokens=12)
    result = export_prompter(artifact, tmp_path / "export", gguf=True)
    assert result.gguf is not None and result.gguf.parent == result.folder and result.gguf.stat().st_size > 0

    reader = GGUFReader(str(result.gguf))
    field = reader.fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode()
    assert template == (result.folder / "chat_template.jinja").read_text()

    adapter = Prompter.from_pretrained(artifact, device="cpu", similarity=None)
    queries, want = adapter_outputs(adapter, PROMPTS)
    model = AutoModelForCausalLM.from_pretrained(str(result.folder), gguf_file=result.gguf.name).eval()
    got = []
    for query in queries:
        ids = tok(query, return_tensors="pt", add_special_tokens=False)
        with torch.inference_mode():
            out = model.generate(
                **ids,
                max_new_tokens=12,
                do_sample=False,
                repetition_penalty=1.05,
                pad_token_id=tok.eos_token_id,
            )
        got.append(tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True))
    assert got == want
    assert len(set(want)) > 1
