"""Tampered and broken prompter artifacts are refused at load, with a message naming the problem and the fix.

Each tampering case is one that an earlier version loaded without a word (issue 39, item 2). The refusals are
ValueErrors (``ArtifactError`` and its subclasses are ValueErrors), so older callers catching ValueError keep
working.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from alignpro_plugins.artifact import holds_adapter
from alignpro_plugins.manifest import MANIFEST_NAME, Manifest, weights_hash
from alignpro_plugins.prompter import Prompter
from alignpro_plugins.testing import build_tiny_prompter, tiny_causal_lm

PROMPTS = ["Tell me about green tea.", "Write a short poem about the sea."]


def load(folder: Path, **kw) -> Prompter:
    kw.setdefault("similarity", None)
    return Prompter.from_pretrained(folder, device="cpu", **kw)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> tuple[Path, Path]:
    """(LoRA artifact folder, its base model folder); tests tamper with copies of the artifact."""
    return build_tiny_prompter(tmp_path_factory.mktemp("artifact-checks"))


@pytest.fixture
def copy(artifact, tmp_path) -> Path:
    return Path(shutil.copytree(artifact[0], tmp_path / "copy"))


def edit_manifest(folder: Path, **changes) -> None:
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DELETE:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))


DELETE = object()


def edit_adapter_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_an_untampered_artifact_loads_and_adapts_the_base(artifact):
    import torch
    from peft import PeftModel

    from alignpro_plugins.lora import LoraLinear

    folder, base_dir = artifact
    loaded = load(folder)
    trainable = load(folder, is_trainable=True)
    try:
        # For inference the adapter is applied without peft; to train further it is a peft model.
        assert not isinstance(loaded.model, PeftModel) and not loaded.model.training
        assert sum(isinstance(m, LoraLinear) for m in loaded.model.modules()) == 4  # q, v in 2 layers
        assert isinstance(trainable.model, PeftModel)
        assert sum(p.numel() for p in trainable.model.parameters() if p.requires_grad) > 0
        ids = torch.tensor([[5, 17, 99, 3]])
        bare = tiny_causal_lm(0, varied=True)[0].eval()
        with torch.no_grad():  # the adapter is really applied
            assert not torch.allclose(loaded.model(ids).logits, bare(ids).logits)
    finally:
        loaded.close()
        trainable.close()


def test_a_zero_shot_artifact_saved_on_purpose_still_loads(artifact, tmp_path):
    _, base_dir = artifact
    zero = Prompter.from_base(str(base_dir), device="cpu", similarity=None)
    folder = zero.save_pretrained(tmp_path / "zero-shot")
    zero.close()
    assert json.loads((folder / MANIFEST_NAME).read_text())["has_adapter"] is False
    loaded = load(folder)
    assert not holds_adapter(loaded.model)
    loaded.close()


# ---------------------------------------------------------------------------------------------- base model
@pytest.mark.parametrize("how", ["null", "missing"])
def test_an_adapter_without_a_base_model_hash_is_refused(copy, how):
    edit_manifest(copy, base_model_hash=None if how == "null" else DELETE)
    with pytest.raises(ValueError) as err:
        load(copy)
    message = str(err.value)
    assert type(err.value).__name__ == "UnverifiedBaseError"
    assert "base_model_hash" in message and "allow_unverified_base=True" in message and str(copy) in message


def test_an_unverified_base_loads_only_when_asked_and_then_warns_loudly(copy, caplog):
    edit_manifest(copy, base_model_hash=None)
    with pytest.warns(UserWarning, match="UNVERIFIED BASE MODEL"):
        loaded = load(copy, allow_unverified_base=True)
    assert holds_adapter(loaded.model)
    assert "UNVERIFIED BASE MODEL" in caplog.text and caplog.records[-1].levelno == logging.WARNING
    loaded.close()


def test_a_base_whose_weights_cannot_be_hashed_is_refused(copy, monkeypatch):
    # As when base_model= names a hub id whose weights are not in the local cache: nothing to compare.
    import alignpro_plugins.artifact as artifact_mod

    monkeypatch.setattr(artifact_mod, "model_weights_hash", lambda name: None)
    with pytest.raises(ValueError, match="no local weights to check against the recorded sha256:"):
        load(copy)
    with pytest.warns(UserWarning, match="UNVERIFIED"):
        load(copy, allow_unverified_base=True).close()


def test_other_base_weights_are_still_refused(copy, tmp_path):
    from alignpro_plugins.prompter import BaseModelMismatchError

    other = tmp_path / "other-base"
    model, tok = tiny_causal_lm(1, varied=True)
    model.save_pretrained(str(other))
    tok.save_pretrained(str(other))
    with pytest.raises(BaseModelMismatchError, match="resolves to weights sha256:"):
        load(copy, base_model=str(other))
    with pytest.raises(BaseModelMismatchError):  # opting in to a missing hash is not opting in to a wrong one
        load(copy, base_model=str(other), allow_unverified_base=True)


def test_a_hub_id_is_hashed_from_its_snapshot_in_the_local_cache(tmp_path, monkeypatch, artifact):
    import huggingface_hub.constants

    from alignpro_plugins.manifest import model_weights_hash

    _, base_dir = artifact
    repo = tmp_path / "hub" / "models--tiny-org--tiny-lm"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.copytree(base_dir, repo / "snapshots" / "0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert model_weights_hash("tiny-org/tiny-lm") == weights_hash(base_dir)
    assert model_weights_hash("tiny-org/not-downloaded") is None
    assert model_weights_hash(str(base_dir)) == weights_hash(base_dir)


# ---------------------------------------------------------------------------------------------- has_adapter
def test_has_adapter_false_on_a_trained_folder_is_refused(copy):
    edit_manifest(copy, has_adapter=False)  # before: the bare base model ran, silently
    with pytest.raises(ValueError) as err:
        load(copy)
    assert "has_adapter: false" in str(err.value) and "Set has_adapter: true" in str(err.value)


def test_has_adapter_false_with_training_stages_but_no_adapter_is_refused(copy):
    edit_manifest(copy, has_adapter=False)
    (copy / "adapter_config.json").unlink()
    (copy / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"records training stages \['sft'\] but has_adapter: false"):
        load(copy)


def test_has_adapter_true_without_the_adapter_names_the_missing_file(copy):
    (copy / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="adapter_model.safetensors is missing"):
        load(copy)


# ---------------------------------------------------------------------------------------------- target_modules
@pytest.mark.parametrize(
    "targets, problem",
    [
        (
            ["k_proj"],
            "8 saved weight",
        ),  # LoRA on k_proj, initialised to a no-op; the saved q/v weights unused
        (["q_proj"], "4 saved weight"),  # half of the adapter silently dropped
        (["q_proj", "v_proj", "k_proj"], "adapter weight(s) have no saved value"),  # k_proj left untrained
        (["no_such_module"], "match no module of the base model"),
    ],
)
def test_target_modules_that_do_not_fit_the_saved_weights_are_refused(copy, targets, problem):
    edit_adapter_config(copy, target_modules=targets, init_lora_weights=True)
    with pytest.raises(ValueError) as err:
        load(copy)
    assert problem in str(err.value) and "adapter" in str(err.value)


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"use_dora": True}, "use_dora"), ({"modules_to_save": ["lm_head"]}, "modules_to_save")],
)
def test_an_adapter_beyond_plain_lora_is_refused_for_inference_naming_the_field(copy, changes, field):
    # Applying it as plain LoRA would silently drop what the feature adds (alignpro_plugins.lora).
    edit_adapter_config(copy, **changes)
    with pytest.raises(ValueError) as err:
        load(copy)
    assert type(err.value).__name__ == "UnsupportedAdapterError"
    assert f"sets {field}:" in str(err.value) and "pip install 'alignpro-plugins[train]'" in str(err.value)


# ---------------------------------------------------------------------------------------------- weights format
@pytest.mark.parametrize("name", ["adapter_model.bin", "weights.pt", "state.pkl", "extra.PTH", "model.ckpt"])
def test_weights_that_are_not_safetensors_are_refused(copy, name):
    import torch

    torch.save({"w": torch.zeros(1)}, copy / name)  # a real torch pickle
    with pytest.raises(ValueError) as err:
        load(copy)
    assert name in str(err.value) and "safetensors" in str(err.value) and "pickle" in str(err.value)


def test_files_in_subfolders_are_not_loaded_and_not_refused(copy):
    # Trainers keep checkpoint-N/ (optimizer.pt, training_args.bin) inside the output folder; nothing there is read.
    (copy / "checkpoint-4").mkdir()
    (copy / "checkpoint-4" / "optimizer.pt").write_bytes(b"not read")
    load(copy).close()


# ---------------------------------------------------------------------------------------------- manifest values
@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"generation": {"max_new_tokens": "abc"}},
            "generation.max_new_tokens must be an integer >= 1, got 'abc'",
        ),
        ({"generation": {"max_new_tokens": -5}}, "generation.max_new_tokens must be an integer >= 1, got -5"),
        ({"generation": {"max_new_tokens": 0}}, "generation.max_new_tokens must be an integer >= 1, got 0"),
        (
            {"generation": {"max_new_tokens": 12.5}},
            "generation.max_new_tokens must be an integer >= 1, got 12.5",
        ),
        (
            {"generation": {"max_new_tokens": True}},
            "generation.max_new_tokens must be an integer >= 1, got True",
        ),
        ({"generation": {"do_sample": "yes"}}, "generation.do_sample must be true or false, got 'yes'"),
        ({"generation": {"temperature": 0}}, "generation.temperature must be a number > 0, got 0"),
        ({"generation": {"top_p": 1.5}}, r"generation.top_p must be a number in \(0, 1\], got 1.5"),
        ({"generation": {"repetition_penalty": None}}, "generation.repetition_penalty must be a number > 0"),
        ({"guard": {"min_similarity": "0.5"}}, r"guard.min_similarity must be a number in \[-1, 1\]"),
        ({"guard": {"min_similarity": 7}}, r"guard.min_similarity must be a number in \[-1, 1\].*got 7"),
        ({"guard": {"min_similarity": float("nan")}}, r"guard.min_similarity must be .*got nan"),
        ({"guard": {"max_length_slack": -1}}, "guard.max_length_slack must be an integer >= 0, got -1"),
        ({"guard": {"max_length_ratio": "4"}}, "guard.max_length_ratio must be a number > 0, got '4'"),
        ({"guard": {"check_protected_spans": 1}}, "guard.check_protected_spans must be true or false, got 1"),
        ({"system_prompt": None}, r"system_prompt must be a string \(may be empty\), got None"),
        ({"system_prompt": 5}, "system_prompt must be a string"),
        ({"mode": "summarise"}, "mode must be one of"),
        ({"instructions": {"augment": "{prompt}", "rewite": "{prompt}"}}, r"unknown mode\(s\) \['rewite'\]"),
        ({"similarity_model": 5}, "similarity_model must be null or a model name, hub id or folder, got 5"),
        ({"similarity_model": " "}, "similarity_model must be null or a model name"),
        ({"has_adapter": "true"}, "has_adapter must be true or false, got 'true'"),
        ({"base_model_hash": "md5:abc"}, "base_model_hash must be null or 'sha256:' \\+ 64 hex digits"),
        ({"base_model": ""}, "base_model must be the base model's name"),
        ({"base_model": None}, "base_model must be the base model's name"),
        ({"provenance": []}, r"provenance must be an object, got \[\]"),
    ],
)
def test_manifest_values_of_the_wrong_type_or_range_are_refused_at_load(copy, changes, message):
    edit_manifest(copy, **changes)
    with pytest.raises(ValueError, match=message) as err:
        load(copy)
    assert str(copy / MANIFEST_NAME) in str(err.value)  # the file is named too
    with pytest.raises(ValueError, match=message):  # and building one in Python is checked the same way
        data = json.loads((copy / MANIFEST_NAME).read_text())
        Manifest.from_dict(data)


def test_a_missing_similarity_model_is_refused_when_the_guard_would_use_it(copy):
    edit_manifest(copy, mode="rewrite", similarity_model="no-such-similarity-model")
    with pytest.raises(ValueError) as err:
        load(copy, similarity="default")
    assert "similarity_model 'no-such-similarity-model'" in str(err.value)
    assert "similarity_model: null" in str(err.value)  # how to fix it
    # The caller's own similarity (or none) replaces the manifest's, so then it loads.
    load(copy, similarity=None).close()
    edit_manifest(copy, mode="augment")  # augment mode never asks the similarity model
    load(copy, similarity="default").close()


def test_a_similarity_model_folder_passes_the_check(tiny_encoder_dir):
    from alignpro_plugins.artifact import check_similarity_model

    check_similarity_model(tiny_encoder_dir)


@pytest.mark.real_models
def test_the_default_packaged_similarity_model_passes_the_check():
    from alignpro_plugins.artifact import check_similarity_model

    check_similarity_model("all-minilm-l6-v2")


def test_the_cli_refuses_an_unverified_base_in_one_line_and_takes_the_opt_in(copy, capsys):
    from alignpro_plugins.cli import main

    edit_manifest(copy, base_model_hash=None)
    assert main(["rewrite", "--prompter", str(copy), "Tell me about tea."]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("alignpro rewrite: error: Refusing to load")
    assert "--allow-unverified-base" in lines[0]
    with pytest.warns(UserWarning, match="UNVERIFIED BASE MODEL"):
        assert (
            main(["rewrite", "--prompter", str(copy), "--allow-unverified-base", "Tell me about tea."]) == 0
        )
    assert capsys.readouterr().out.strip()
