"""alignpro_plugins.lora applies a saved PEFT LoRA adapter without peft, computing exactly what peft computes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from alignpro_plugins.lora import (
    AdapterError,
    LoraLinear,
    UnsupportedAdapterError,
    applied_lora,
    apply_lora,
    merge_lora,
    save_lora,
)
from alignpro_plugins.testing import build_tiny_causal_lm

# Two rows of different lengths, left-padded like the engine's batches.
IDS = torch.tensor([[258, 258, 5, 17, 99, 3, 44], [12, 200, 7, 7, 150, 31, 2]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
ALL_LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CONFIGS = {
    "q-v": {"r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
    "rslora-all-linear": {"r": 8, "lora_alpha": 4, "use_rslora": True, "target_modules": "all-linear"},
    "rank-and-alpha-patterns": {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ALL_LLAMA_LINEAR,
        "rank_pattern": {"q_proj": 2, "model.layers.1.self_attn.v_proj": 6},
        "alpha_pattern": {"o_proj": 3, "down_proj": 32},
    },
    "regex-target": {"r": 2, "lora_alpha": 5, "target_modules": r".*layers\.1\.mlp\.(up|down)_proj"},
    "layers-and-exclude": {
        "r": 4,
        "lora_alpha": 16,
        "target_modules": ["q_proj", "v_proj", "up_proj"],
        "layers_to_transform": [1],
        "exclude_modules": ["up_proj"],
    },
    "dropout-and-lm-head": {
        "r": 3,
        "lora_alpha": 6,
        "lora_dropout": 0.3,
        "target_modules": ["lm_head", "k_proj"],
    },
}


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory) -> Path:
    return Path(build_tiny_causal_lm(tmp_path_factory.mktemp("lora-base"), varied=True))


def load_base(folder: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()


def save_peft_adapter(base_dir: Path, out: Path, seed: int = 1, **config) -> Path:
    """A PEFT adapter trained on nothing but with random non-zero weights (init_lora_weights=False)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    get_peft_model(load_base(base_dir), LoraConfig(init_lora_weights=False, **config)).save_pretrained(
        str(out)
    )
    return out


def peft_model(base_dir: Path, adapter: Path, dtype: torch.dtype = torch.float32):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_base(base_dir, dtype), str(adapter)).eval()


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS, attention_mask=MASK).logits


def greedy(model) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(
            input_ids=IDS, attention_mask=MASK, max_new_tokens=12, do_sample=False, pad_token_id=258
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_greedy_outputs_are_bit_identical_to_peft(llama_base, tmp_path, name, dtype):
    adapter = save_peft_adapter(llama_base, tmp_path / "adapter", **CONFIGS[name])
    reference = peft_model(llama_base, adapter, dtype)
    ours = apply_lora(load_base(llama_base, dtype), adapter)
    assert not hasattr(ours, "peft_config")  # a plain transformers model with LoRA layers
    layers = {n for n, m in ours.named_modules() if isinstance(m, LoraLinear)}
    assert layers == {
        n.removeprefix("base_model.model.") for n, m in reference.named_modules() if _is_peft_lora(m)
    }
    assert torch.equal(logits(ours), logits(reference))
    assert torch.equal(greedy(ours), greedy(reference))
    assert not torch.equal(logits(ours), logits(load_base(llama_base, dtype)))  # the adapter does something


def _is_peft_lora(module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer)


def test_rank_and_alpha_patterns_set_each_layers_scaling(llama_base, tmp_path):
    adapter = save_peft_adapter(llama_base, tmp_path / "adapter", **CONFIGS["rank-and-alpha-patterns"])
    layers = {
        n: m
        for n, m in apply_lora(load_base(llama_base), adapter).named_modules()
        if isinstance(m, LoraLinear)
    }
    assert layers["model.layers.0.self_attn.q_proj"].lora_A.weight.shape[0] == 2
    assert layers["model.layers.0.self_attn.q_proj"].scaling == 8 / 2
    assert layers["model.layers.1.self_attn.v_proj"].scaling == 8 / 6
    assert layers["model.layers.0.self_attn.v_proj"].scaling == 8 / 4
    assert layers["model.layers.0.self_attn.o_proj"].scaling == 3 / 4
    assert layers["model.layers.1.mlp.down_proj"].scaling == 32 / 4


def test_conv1d_layers_fan_in_fan_out_match_peft_and_merge_like_peft(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(
        GPT2Config(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    ).save_pretrained(str(base_dir))
    adapter = save_peft_adapter(
        base_dir,
        tmp_path / "adapter",
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj"],
        fan_in_fan_out=True,
    )
    reference = peft_model(base_dir, adapter)
    ours = apply_lora(load_base(base_dir), adapter)
    assert (
        sum(isinstance(m, LoraLinear) and m.fan_in_fan_out for m in ours.modules()) == 6
    )  # 2 x (c_attn, 2 c_proj)
    assert torch.equal(logits(ours), logits(reference))
    merged, peft_merged = merge_lora(ours).state_dict(), reference.merge_and_unload().state_dict()
    assert merged.keys() == peft_merged.keys() and all(torch.equal(merged[k], peft_merged[k]) for k in merged)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_merged_weights_equal_peft_merge_and_unload(llama_base, tmp_path, dtype):
    adapter = save_peft_adapter(llama_base, tmp_path / "adapter", **CONFIGS["rank-and-alpha-patterns"])
    merged = merge_lora(apply_lora(load_base(llama_base, dtype), adapter))
    assert applied_lora(merged) is None and not any(isinstance(m, LoraLinear) for m in merged.modules())
    want = peft_model(llama_base, adapter, dtype).merge_and_unload().state_dict()
    got = merged.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert not torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"],
        load_base(llama_base, dtype).state_dict()["model.layers.0.self_attn.q_proj.weight"],
    )


def test_save_and_load_round_trip_keeps_every_weight(llama_base, tmp_path):
    from safetensors.torch import load_file

    adapter = save_peft_adapter(llama_base, tmp_path / "adapter", **CONFIGS["rank-and-alpha-patterns"])
    ours = apply_lora(load_base(llama_base), adapter)
    save_lora(ours, tmp_path / "again", base_model_name_or_path="tiny-org/tiny-base")
    saved, original = (
        load_file(str(tmp_path / "again" / "adapter_model.safetensors")),
        load_file(str(adapter / "adapter_model.safetensors")),
    )
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    config = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-org/tiny-base"
    assert {k: v for k, v in config.items() if k != "base_model_name_or_path"} == {
        k: v
        for k, v in json.loads((adapter / "adapter_config.json").read_text()).items()
        if k != "base_model_name_or_path"
    }
    # Both loaders read the re-saved folder back to the same model.
    again = apply_lora(load_base(llama_base), tmp_path / "again")
    assert torch.equal(logits(again), logits(ours))
    assert torch.equal(logits(peft_model(llama_base, tmp_path / "again")), logits(ours))


def test_a_prompter_loaded_for_inference_saves_an_adapter_that_loads_the_same(llama_base, tmp_path):
    from alignpro_plugins.manifest import GenerationDefaults, Manifest, weights_hash
    from alignpro_plugins.prompter import Prompter
    from tests.test_export import PROMPTS

    lora = peft_model(llama_base, save_peft_adapter(llama_base, tmp_path / "adapter", **CONFIGS["q-v"]))
    manifest = Manifest(
        base_model=str(llama_base),
        base_model_hash=weights_hash(llama_base),
        generation=GenerationDefaults(max_new_tokens=10),
        similarity_model=None,
    )
    trained = Prompter(
        lora, Prompter.from_base(str(llama_base), device="cpu").tokenizer, manifest, similarity=None
    )
    first = trained.save_pretrained(tmp_path / "first")
    loaded = Prompter.from_pretrained(first, device="cpu", similarity=None)
    second = loaded.save_pretrained(tmp_path / "second")  # an inference prompter re-saved (no peft involved)
    reloaded = Prompter.from_pretrained(second, device="cpu", similarity=None)
    try:
        assert applied_lora(loaded.model) is not None and applied_lora(reloaded.model) is not None
        want = trained.rewrite_results(PROMPTS)
        assert loaded.rewrite_results(PROMPTS) == want and reloaded.rewrite_results(PROMPTS) == want
        assert json.loads((second / "alignpro.json").read_text()) == json.loads(
            (first / "alignpro.json").read_text()
        )
    finally:
        for p in (trained, loaded, reloaded):
            p.close()


# ---------------------------------------------------------------------------------------------- refusals
@pytest.fixture(scope="module")
def plain_adapter(llama_base, tmp_path_factory) -> Path:
    return save_peft_adapter(llama_base, tmp_path_factory.mktemp("plain") / "adapter", **CONFIGS["q-v"])


def edited(adapter: Path, tmp_path: Path, **changes) -> Path:
    copy = Path(shutil.copytree(adapter, tmp_path / "edited"))
    path = copy / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return copy


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"use_dora": True}, "use_dora"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "lora_only"}, "bias"),
        ({"bias": "all"}, "bias"),
        ({"lora_bias": True}, "lora_bias"),
        ({"peft_type": "LOHA"}, "peft_type"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"target_parameters": ["mlp.up_proj.weight"]}, "target_parameters"),
        ({"trainable_token_indices": [3, 4]}, "trainable_token_indices"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"target_modules": ["embed_tokens"]}, "target_modules"),  # embedding LoRA
        ({"some_future_variant": {"k": 1}}, "some_future_variant"),
    ],
)
def test_what_is_not_plain_lora_on_linear_layers_is_refused_naming_the_field(
    llama_base, plain_adapter, tmp_path, changes, field
):
    model = load_base(llama_base)
    with pytest.raises(UnsupportedAdapterError) as err:
        apply_lora(model, edited(plain_adapter, tmp_path, **changes))
    message = str(err.value)
    assert f"sets {field}:" in message and "pip install 'alignpro-plugins[train]'" in message
    assert "PeftModel.from_pretrained" in message
    assert applied_lora(model) is None and not any(isinstance(m, LoraLinear) for m in model.modules())


def test_a_real_dora_adapter_is_refused(llama_base, tmp_path):
    adapter = save_peft_adapter(llama_base, tmp_path / "dora", r=4, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(UnsupportedAdapterError, match="sets use_dora: true .DoRA."):
        apply_lora(load_base(llama_base), adapter)


def test_weights_of_another_rank_than_the_config_says_are_refused(llama_base, plain_adapter, tmp_path):
    with pytest.raises(AdapterError, match=r"rank r=8 .* needs \(8, 32\)"):
        apply_lora(load_base(llama_base), edited(plain_adapter, tmp_path, r=8))


def test_a_broken_config_and_a_second_adapter_are_refused(llama_base, plain_adapter, tmp_path):
    broken = Path(shutil.copytree(plain_adapter, tmp_path / "broken"))
    (broken / "adapter_config.json").write_text('{"r": 4,')
    with pytest.raises(AdapterError, match="is not a valid PEFT adapter config"):
        apply_lora(load_base(llama_base), broken)
    model = apply_lora(load_base(llama_base), plain_adapter)
    with pytest.raises(AdapterError, match="already carries a LoRA adapter"):
        apply_lora(model, plain_adapter)


def test_the_base_weight_peft_saves_with_a_targeted_lm_head_is_loaded_back_as_peft_does(llama_base, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = save_peft_adapter(llama_base, tmp_path / "adapter", **CONFIGS["dropout-and-lm-head"])
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    key = "base_model.model.lm_head.base_layer.weight"
    weights[key] = (
        weights[key] + 0.01
    )  # as if the head differed from the base folder's: peft loads the saved one
    save_file(weights, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    ours = apply_lora(load_base(llama_base), adapter)
    assert torch.equal(logits(ours), logits(peft_model(llama_base, adapter)))
    save_lora(ours, tmp_path / "again")
    assert torch.equal(load_file(str(tmp_path / "again" / "adapter_model.safetensors"))[key], weights[key])


def test_a_trained_prompter_loads_and_rewrites_where_peft_and_accelerate_are_not_installed(
    llama_base, tmp_path
):
    import subprocess
    import sys
    import textwrap

    from alignpro_plugins.manifest import GenerationDefaults, Manifest, weights_hash
    from alignpro_plugins.prompter import Prompter
    from tests.test_export import PROMPTS

    lora = peft_model(llama_base, save_peft_adapter(llama_base, tmp_path / "adapter", **CONFIGS["q-v"]))
    tokenizer = Prompter.from_base(str(llama_base), device="cpu").tokenizer
    manifest = Manifest(
        base_model=str(llama_base),
        base_model_hash=weights_hash(llama_base),
        generation=GenerationDefaults(max_new_tokens=10),
        similarity_model=None,
    )
    trained = Prompter(lora, tokenizer, manifest, similarity=None)
    folder = trained.save_pretrained(tmp_path / "prompter")
    want = trained.rewrite_batch(PROMPTS)
    trained.close()
    script = textwrap.dedent(
        f"""
        import json, sys
        for name in ("peft", "accelerate"):  # not installed: import fails, find_spec says None
            sys.modules[name] = None
        from alignpro_plugins import Prompter
        from alignpro_plugins.extras import MissingExtraError
        prompter = Prompter.from_pretrained({str(folder)!r}, device="cpu", similarity=None)
        try:
            Prompter.from_pretrained({str(folder)!r}, device="cpu", similarity=None, is_trainable=True)
            trainable = "loaded"
        except MissingExtraError as exc:
            trainable = str(exc)
        print(json.dumps({{"rewrites": prompter.rewrite_batch({PROMPTS!r}), "trainable": trainable}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["rewrites"] == want
    assert (
        "needs peft" in result["trainable"] and "pip install 'alignpro-plugins[train]'" in result["trainable"]
    )
