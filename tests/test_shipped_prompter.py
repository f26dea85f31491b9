"""The prompter shipped inside the package (alignpro_plugins/prompters, benchmarks/ship_prompter.py).

* Shipping copies only what the runtime reads: the adapter in float16, its config, the manifest with portable
  paths, the chat template, the card and the numbers it quotes; the tokenizer only when it is not the base's.
* The shipped folder loads as users load it (base hash, adapter fit), in float32 from float16 weights, with peft
  too; its card quotes the summary's numbers and its limitations follow them.
* ``--compare`` says which retrained numbers fall outside the shipped intervals, and fails then; ``--record``
  keeps that comparison with the shipped prompter and shows it on its card.
* Every entry point loads a packaged prompter by name; an unknown name lists the packaged ones.
* The package's own index and folders agree, the wheel carries them, and (real_models) the shipped prompter loads
  by name from the installed package and rewrites offline.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignpro_plugins import prompters
from alignpro_plugins.manifest import Manifest, appends_guidance, weights_hash
from alignpro_plugins.prompter import Prompter
from alignpro_plugins.prompters import SHIPPED_PROMPTER, packaged_prompter_folder, packaged_prompters
from alignpro_plugins.testing import build_tiny_prompter
from benchmarks import ship_prompter
from benchmarks.prompter_card import render_card
from benchmarks.ship_prompter import BENCHMARK, CARD, ShipError, compare, ship

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny-shipped"
BASE_ID = "tiny-org/tiny-base"
PROMPTS = ["Explain tides.", "Write a haiku about tea.", "List three prime numbers."]
RUNTIME_FILES = {
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "alignpro.json",
    "benchmark.json",
    "chat_template.jinja",
}
META = {
    "command": "python -m benchmarks.run_benchmark",
    "date": "2026-12-06",
    "machine": "vm: 2 cores (test CPU), torch 2.13.0+cpu, no GPU",
    "git": "abc1234",
    "budget": {
        "rm_steps": 80,
        "boot_prompts": 128,
        "k": 0,
        "sft_epochs": 6,
        "kl_rounds": 3,
        "eval_tokens": 128,
    },
    "reward_accuracy": 0.676,
    "judge_accuracy": 0.687,
    "guidance_text": "Give a complete, detailed answer.",
}


def w(rate: float, low: float, high: float, **extra) -> dict:
    return {"win_rate": rate, "ci_low": low, "ci_high": high, "n": 100, **extra}


# ---------------------------------------------------------------------------------------------- a trained run
@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A Hugging Face cache holding the tiny base under a hub id: a shipped prompter names a portable base."""
    import huggingface_hub.constants

    cache = tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def run(hub, tmp_path_factory) -> Path:
    """A run folder as the benchmark leaves it: the artifact rl-kl (base by hub id, provenance with this
    machine's paths) among round checkpoints, metrics, a target cache and peft's card."""
    root = tmp_path_factory.mktemp("run")
    folder, base_dir = build_tiny_prompter(root / "build")
    repo = hub / ("models--" + BASE_ID.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    shutil.copytree(base_dir, repo / "snapshots" / "0123abcd")
    artifact = Path(shutil.copytree(folder, root / "rl-kl"))
    manifest = Manifest.load(artifact)
    manifest.base_model = BASE_ID
    manifest.provenance = {
        "stages": [
            {"stage": "sft", "steps": 3, "reward_model": str(root / "reward"), "data": "in-memory"},
            {"stage": "rl", "algorithm": "kl-optimum", "beta": 0.5, "reward_model": str(root / "reward")},
        ]
    }
    manifest.save(artifact)
    shutil.copytree(artifact, artifact / "round-0")
    (artifact / "metrics.jsonl").write_text('{"stage": "rl", "step": 1}\n')
    (artifact / "target_cache.jsonl").write_text('{"prompt": "x", "answer": "y"}\n')
    (artifact / "README.md").write_text("# Model Card for Model ID\n[More Information Needed]\n")
    weights_hash(artifact)  # leaves .alignpro-weights-hash.json, as every load does
    return artifact


@pytest.fixture(scope="module")
def summary_file(run, tmp_path_factory) -> Path:
    """{"meta", "summary"}: a real (tiny) Evaluator summary with the headline numbers set to known values."""
    from alignpro_plugins.evaluation import Evaluator, FixedTemplate, FrozenAlone, WithPrompter
    from alignpro_plugins.rewards import CallableReward, RewardFunction
    from alignpro_plugins.targets import CallableTarget

    prompter = Prompter.from_pretrained(run, device="cpu", similarity=None)
    target = CallableTarget(lambda x: " ".join(["word"] * (len(x) % 7 + 1)), name="wordy")
    judges: dict[str, RewardFunction] = {
        name: CallableReward(lambda ps, ans, m=m: [sum(map(ord, a)) % m / m for a in ans], name=name)
        for name, m in (("reward", 97), ("independent", 89))
    }
    out = tmp_path_factory.mktemp("eval")
    report = Evaluator(PROMPTS, target, judges, out_dir=out).run(
        [FrozenAlone(), FixedTemplate(), WithPrompter(prompter=prompter)]
    )
    prompter.close()
    summary = json.loads(json.dumps(report.summary))
    c = summary["configs"]["align-pro"]
    c["independent"]["vs_reference"] = w(0.64, 0.55, 0.74)
    c["independent"]["vs_reference_length_controlled"] = w(0.55, 0.40, 0.68, length_coef=1.0)
    c["reward"]["vs_reference"] = w(0.70, 0.61, 0.79)
    c["reward"]["vs_reference_length_controlled"] = w(0.58, 0.45, 0.71)
    c["independent"]["variance_ratio_vs_reference"] = {
        "ratio": 0.93,
        "ci_low": 0.81,
        "ci_high": 1.07,
        "n": 100,
    }
    c["outputs"] = {"distinct": 2, "top": "Give a complete,\n detailed answer.", "top_share": 0.99, "n": 100}
    c["mean_answer_words"], summary["configs"]["frozen"]["mean_answer_words"] = 97.0, 65.0
    h2h = summary["head_to_head"]["template"]
    h2h["independent"] = w(0.595, 0.51, 0.68, length_controlled=w(0.52, 0.38, 0.66))
    h2h["reward"] = w(0.61, 0.52, 0.70, length_controlled=w(0.56, 0.42, 0.69))
    summary["n_prompts"] = 100
    path = out / "benchmark-summary.json"
    path.write_text(json.dumps({"meta": META, "summary": summary}))
    return path


@pytest.fixture(scope="module")
def shipped(run, summary_file, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prompters")
    return ship(run, summary_file, NAME, root=root, check_prompts=PROMPTS)


@pytest.fixture
def registry(shipped, monkeypatch) -> Path:
    """The package's packaged prompters are the tiny shipped one."""
    monkeypatch.setattr(prompters, "PACKAGE_DIR", shipped.parent)
    return shipped


# ---------------------------------------------------------------------------------------------- shipping
def test_only_the_runtime_files_are_shipped_and_the_index_lists_them(shipped, run):
    files = {p.name for p in shipped.iterdir() if not p.name.startswith(".")}
    assert files == RUNTIME_FILES  # no round-*/, metrics, target cache, peft card or tokenizer
    assert (
        run / "tokenizer.json"
    ).is_file()  # the trained artifact had one: it is the base's, so not shipped
    entry = packaged_prompters(shipped.parent)[NAME]
    assert set(entry.files) == RUNTIME_FILES and entry.folder == shipped
    assert entry.base_model == BASE_ID and entry.base_model_hash == Manifest.load(run).base_model_hash
    assert entry.weights_hash == weights_hash(shipped)


def test_the_weights_are_the_trained_ones_in_float16(shipped, run):
    trained, half = (
        load_file(str(run / "adapter_model.safetensors")),
        load_file(str(shipped / "adapter_model.safetensors")),
    )
    assert trained.keys() == half.keys()
    for key, tensor in trained.items():
        assert tensor.dtype == torch.float32 and half[key].dtype == torch.float16
        assert torch.equal(half[key], tensor.to(torch.float16)), key
    recorded = json.loads((shipped / BENCHMARK).read_text())["weights"]
    assert recorded["dtype"] == "float16" and recorded["parameters"] == sum(
        t.numel() for t in trained.values()
    )
    assert recorded["bytes"] < 0.6 * recorded["source_bytes"]
    assert 0 < recorded["max_abs_error"] < 1e-2


def test_the_shipped_folder_loads_in_float32_and_rewrites_as_the_float16_values_do(shipped, run, tmp_path):
    from alignpro_plugins.lora import LoraLinear

    loaded = Prompter.from_pretrained(shipped, device="cpu", similarity=None)  # base hash and adapter checked
    half = load_file(str(shipped / "adapter_model.safetensors"))
    layers = {n: m for n, m in loaded.model.named_modules() if isinstance(m, LoraLinear)}
    assert layers
    for name, layer in layers.items():
        assert layer.lora_A.weight.dtype == torch.float32
        assert torch.equal(layer.lora_A.weight, half[f"base_model.model.{name}.lora_A.weight"].float())
    # The trained artifact with its weights rounded to float16 by hand rewrites exactly as the shipped one.
    rounded = Path(shutil.copytree(run, tmp_path / "rounded", ignore=shutil.ignore_patterns("round-*", ".*")))
    from safetensors.torch import save_file

    save_file({k: v.float() for k, v in half.items()}, str(rounded / "adapter_model.safetensors"))
    reference = Prompter.from_pretrained(rounded, device="cpu", similarity=None)
    original = Prompter.from_pretrained(run, device="cpu", similarity=None)
    try:
        got = loaded.rewrite_results(PROMPTS)
        assert got == reference.rewrite_results(PROMPTS)
        identical = sum(
            a.generated == b.generated for a, b in zip(original.rewrite_results(PROMPTS), got, strict=True)
        )
    finally:
        for p in (loaded, reference, original):
            p.close()
    record = json.loads((shipped / BENCHMARK).read_text())["half_precision"]
    assert record == {"prompts": len(PROMPTS), "identical": identical}


def test_peft_loads_the_float16_adapter_to_train_it_further(shipped):
    from peft import get_peft_model_state_dict

    loaded = Prompter.from_pretrained(shipped, device="cpu", similarity=None, is_trainable=True)
    try:
        state = get_peft_model_state_dict(loaded.model)
        half = load_file(str(shipped / "adapter_model.safetensors"))
        assert state.keys() == half.keys()
        for key, value in state.items():
            assert value.dtype == torch.float32 and torch.equal(value, half[key].float()), key
    finally:
        loaded.close()


def test_the_manifest_keeps_its_provenance_without_this_machines_paths(shipped, run):
    for f in shipped.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            assert str(run.parent) not in f.read_text(), f"{f.name} names a path of the training machine"
    manifest = Manifest.load(shipped)
    trained = Manifest.load(run)
    stages = manifest.provenance["stages"]
    assert [s["stage"] for s in stages] == ["sft", "rl"] and stages[1]["beta"] == 0.5
    assert stages[0]["reward_model"] == "reward (a local path of the machine that trained it)"
    assert manifest.provenance["shipped"]["git"] == "abc1234"
    assert manifest.provenance["shipped"]["command"] == META["command"]
    # Everything that decides the rewrites is the trained artifact's.
    for field in (
        "base_model",
        "base_model_hash",
        "mode",
        "instructions",
        "generation",
        "query_chat_template",
    ):
        assert getattr(manifest, field) == getattr(trained, field), field
    adapter = json.loads((shipped / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == BASE_ID


def test_ship_refuses_a_base_named_by_a_folder_of_this_machine(tmp_path, summary_file):
    folder, _ = build_tiny_prompter(tmp_path)  # its manifest names the base by its local folder
    with pytest.raises(ShipError, match="a folder of this machine"):
        ship(folder, summary_file, NAME, root=tmp_path / "prompters")
    assert not (tmp_path / "prompters" / NAME).exists()


def test_a_tokenizer_other_than_the_bases_is_shipped(run, summary_file, tmp_path):
    from transformers import AutoTokenizer

    artifact = Path(shutil.copytree(run, tmp_path / "rl-kl", ignore=shutil.ignore_patterns("round-*")))
    tok = AutoTokenizer.from_pretrained(str(artifact))
    tok.add_tokens(["<|newtoken|>"])
    tok.save_pretrained(str(artifact))
    folder = ship(artifact, summary_file, NAME, root=tmp_path / "prompters")
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    assert "its own, shipped here" in (folder / CARD).read_text()


# ---------------------------------------------------------------------------------------------- the card
def test_the_card_quotes_the_summary(shipped, run):
    card = (shipped / CARD).read_text()
    manifest = Manifest.load(run)
    rows = {
        line.split(" | ")[0].lstrip("| "): line for line in card.splitlines() if line.startswith("| the ")
    }
    assert rows["the bare prompt"] == "| the bare prompt | wins, 64.0% [55–74] | wins, 70.0% [61–79] |"
    assert rows["the bare prompt at equal length"] == (
        "| the bare prompt at equal length | ties, 55.0% [40–68] | ties, 58.0% [45–71] |"
    )
    assert (
        rows["the default instruction"]
        == "| the default instruction | wins, 59.5% [51–68] | wins, 61.0% [52–70] |"
    )
    assert rows["the default instruction at equal length"] == (
        "| the default instruction at equal length | ties, 52.0% [38–66] | ties, 56.0% [42–69] |"
    )
    assert f"weights hash `{manifest.base_model_hash}`" in card
    assert "git abc1234" in card and f"`{META['command']}`" in card
    assert "python -m benchmarks.run_benchmark --skip-oracle --no-docs --out runs/bench-repro" in card
    assert (
        f"python -m benchmarks.ship_prompter --compare runs/bench-repro/eval/results.json --name {NAME}"
        in card
    )
    for licence in ("| MIT |", "| Apache-2.0 |", "CC-BY-SA-3.0"):
        assert licence in card
    assert "- reward model and judge: `rm_steps=80`" in card
    assert "- SFT (best-of-K bootstrap): `boot_prompts=128`, `k=0`, `sft_epochs=6`" in card
    assert "- RL (kl-optimum): `kl_rounds=3`" in card
    assert "**rl**: algorithm kl-optimum; beta 0.5" in card
    assert "answers average 97 words; the bare prompt's 65" in card
    assert "2 distinct on 100 prompts" in card and "“Give a complete, detailed answer.”" in card
    assert f"greedy rewrites of {len(PROMPTS)} held-out prompts" in card


def test_the_limitations_follow_the_numbers(shipped, run):
    benchmark = json.loads((shipped / BENCHMARK).read_text())
    manifest = Manifest.load(shipped)
    adapter = json.loads((shipped / "adapter_config.json").read_text())
    card = render_card(NAME, manifest, adapter, benchmark)
    limits = card.split("## What it is not good at")[1].split("## Reproduce")[0]
    assert "It appends the same guidance to 99 of the 100 held-out prompts" in limits
    assert "the text the guidance search chose" in limits
    assert "**Much of its gain is length.** Its answers average 97 words, the bare prompt's 65" in limits
    assert "at equal answer length it ties, 55.0% [40–68]" in limits
    assert "**No reliable drop in variance.**" in limits and "0.93×" in limits
    assert "No clear gain over a fixed instruction" not in limits  # it wins against the default instruction
    assert "The judges disagree" not in limits
    assert "at most 128 tokens" in limits and "about ±9 points" in limits

    better = copy.deepcopy(benchmark)
    c = better["summary"]["configs"]["align-pro"]
    c["outputs"].update(distinct=100, top_share=0.01)
    c["independent"]["vs_reference_length_controlled"] = w(0.62, 0.53, 0.71)
    c["independent"]["variance_ratio_vs_reference"] = {"ratio": 0.8, "ci_low": 0.7, "ci_high": 0.9, "n": 100}
    c["reward"]["vs_reference"] = w(0.5, 0.4, 0.6)
    better["summary"]["head_to_head"]["template"]["independent"] = w(
        0.48, 0.39, 0.57, length_controlled=w(0.5, 0.4, 0.6)
    )
    limits = render_card(NAME, manifest, adapter, better).split("## What it is not good at")[1]
    assert "One text for most prompts" not in limits and "gain is length" not in limits
    assert "drop in variance" not in limits
    assert "**No clear gain over a fixed instruction.** Against the default instruction" in limits
    assert "it ties, 48.0% [39–57]" in limits
    assert (
        "**The judges disagree.** Against the bare prompt it wins under the independent judge and ties"
        in limits
    )


def test_a_summary_without_the_compared_configurations_is_refused(run, summary_file, tmp_path):
    data = json.loads(summary_file.read_text())
    del data["summary"]["configs"]["template"]
    bad = tmp_path / "summary.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ShipError, match="no 'template' configuration"):
        ship(run, bad, NAME, root=tmp_path / "prompters")
    results = tmp_path / "results.json"  # an eval/results.json: numbers but no meta (command, git, budget)
    results.write_text(
        json.dumps({"summary": json.loads(summary_file.read_text())["summary"], "records": []})
    )
    with pytest.raises(ShipError, match="has no 'meta'"):
        ship(run, results, NAME, root=tmp_path / "prompters")


# ---------------------------------------------------------------------------------------------- reproduction
def test_compare_says_which_retrained_numbers_fall_outside_the_shipped_intervals(
    shipped, summary_file, tmp_path, capsys
):
    summary = json.loads(summary_file.read_text())["summary"]
    retrained = copy.deepcopy(summary)
    retrained["configs"]["align-pro"]["independent"]["vs_reference"]["win_rate"] = 0.70  # inside [55–74]
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"summary": retrained, "records": []}))
    args = ["--compare", str(results), "--root", str(shipped.parent), "--name", NAME]
    assert ship_prompter.main(args) == 0
    out = capsys.readouterr().out
    assert "| vs the bare prompt | independent | 64.0% [55–74] | 70.0% | yes |" in out
    assert "all 8 retrained numbers fall inside" in out

    retrained["head_to_head"]["template"]["reward"]["length_controlled"]["win_rate"] = 0.30  # outside [42–69]
    results.write_text(json.dumps({"summary": retrained, "records": []}))
    assert ship_prompter.main(args) == 1
    out = capsys.readouterr().out
    assert "| vs the default instruction at equal length | reward | 56.0% [42–69] | 30.0% | NO |" in out
    lines, ok = compare(summary, retrained)
    assert not ok and sum(line.endswith("| NO |") for line in lines) == 1


def retrained_run(tmp_path: Path, summary: dict, **meta) -> Path:
    """A retrained run's eval/results.json with its benchmark-summary.json (the run's metadata) beside it."""
    run_meta = {
        **META,
        "command": "python -m benchmarks.run_benchmark --out runs/bench-repro",
        "git": "def5678",
    }
    results = tmp_path / "eval" / "results.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"summary": summary, "records": []}))
    (results.parent / "benchmark-summary.json").write_text(
        json.dumps({"meta": {**run_meta, **meta}, "summary": summary})
    )
    return results


def test_record_stores_the_comparison_and_the_card_shows_it(shipped, run, summary_file, tmp_path, capsys):
    folder = Path(shutil.copytree(shipped, tmp_path / "prompters" / NAME))
    card_before = (folder / CARD).read_text()
    summary = json.loads(summary_file.read_text())["summary"]
    retrained = copy.deepcopy(summary)
    retrained["configs"]["align-pro"]["independent"]["vs_reference"]["win_rate"] = 0.80  # outside [55–74]
    retrained["configs"]["align-pro"]["outputs"] = {
        "distinct": 5,
        "top": "Be brief.",
        "top_share": 0.9,
        "n": 100,
    }
    retrained["configs"]["align-pro"]["mean_answer_words"] = 88.0
    results = retrained_run(
        tmp_path,
        retrained,
        guidance_text="Be brief.",
        command=f"python -m benchmarks.run_benchmark --out {ROOT / 'runs' / 'bench-repro'}",
    )
    shutil.copytree(run, tmp_path / "rl-kl")  # the retrained run's prompter: the one shipped, trained again
    args = ["--compare", str(results), "--root", str(folder.parent), "--name", NAME, "--record"]
    assert ship_prompter.main(args) == 1  # recorded although a number fell outside
    assert "recorded in" in capsys.readouterr().out

    rep = json.loads((folder / BENCHMARK).read_text())["reproduction"]
    assert rep["git"] == "def5678" and rep["n_prompts"] == 100
    assert [r["inside"] for r in rep["rows"]].count(False) == 1
    card = (folder / CARD).read_text()
    assert card.startswith(card_before.split("## Licence")[0].rstrip())  # the rest of the card is unchanged
    section = card.split("### Reproduction on record")[1].split("## Licence")[0]
    assert (
        "`python -m benchmarks.run_benchmark --out runs/bench-repro` (2026-12-06, git def5678; vm: 2 cores"
        in section
    )
    assert "7 of 8 numbers fall inside the shipped 95% intervals" in section
    assert "not on the same prompts" not in section
    assert "\n\n| number | judge |" in section and " |\n\n- the retrained" in section  # a table alone
    assert "| vs the bare prompt | independent | 64.0% [55–74] | 80.0% | no |" in section
    assert "- the retrained guidance search chose another text: “Be brief.”" in section
    assert "5 distinct outputs on 100 prompts, the most common on 90.0% of them: “Be brief.”" in section
    assert (
        "- its adapter, converted to float16, is identical to the shipped one, weight for weight" in section
    )
    assert "- its answers average 88 words (the shipped prompter's 97)" in section
    Prompter.from_pretrained(folder, similarity=None).close()  # still loads: weights and manifest untouched

    # Another run, on fewer prompts and with the shipped guidance text: the card says both.
    retrained["n_prompts"] = 50
    results = retrained_run(tmp_path / "again", retrained, git="0a0a0a0", guidance_text=META["guidance_text"])
    from safetensors.torch import load_file, save_file

    other = Path(shutil.copytree(run, tmp_path / "again" / "rl-kl")) / "adapter_model.safetensors"
    weights = load_file(str(other))
    save_file({k: t + 1e-2 for k, t in weights.items()}, str(other))  # another adapter
    assert ship_prompter.main([*args[:1], str(results), *args[2:]]) == 1
    card = (folder / CARD).read_text()
    assert card.count("### Reproduction on record") == 1 and "git 0a0a0a0" in card
    assert "The shipped run evaluated 100 prompts: the numbers are not on the same prompts." in card
    assert "- the retrained guidance search chose the same text" in card
    assert "- its adapter, converted to float16, is not the shipped one" in card

    # Shipping a new artifact drops the record: it was measured against the old one.
    ship(run, summary_file, NAME, root=folder.parent)
    assert "reproduction" not in json.loads((folder / BENCHMARK).read_text())
    assert "Reproduction on record" not in (folder / CARD).read_text()


def test_record_needs_a_new_run_with_its_metadata(shipped, summary_file, tmp_path, capsys):
    folder = Path(shutil.copytree(shipped, tmp_path / "prompters" / NAME))
    summary = json.loads(summary_file.read_text())["summary"]
    record = ["--root", str(folder.parent), "--name", NAME, "--record"]
    results = tmp_path / "results.json"  # no meta in it and no benchmark-summary.json beside it
    results.write_text(json.dumps({"summary": summary}))
    assert ship_prompter.main(["--compare", str(results), *record]) == 2
    err = capsys.readouterr()
    assert "give the retrained run's <out>/eval/benchmark-summary.json" in err.err
    assert err.out == ""  # refused before a comparison is printed
    no_git = retrained_run(tmp_path / "no-git", summary, git="")
    assert ship_prompter.main(["--compare", str(no_git), *record]) == 2
    assert "its run metadata lacks git" in capsys.readouterr().err
    # The shipped run's own summary is not a reproduction of it.
    assert ship_prompter.main(["--compare", str(summary_file), *record]) == 2
    assert "is the shipped run itself" in capsys.readouterr().err
    assert "reproduction" not in json.loads((folder / BENCHMARK).read_text())
    with pytest.raises(SystemExit):
        ship_prompter.main(["--record", "--root", str(folder.parent)])
    assert "--record stores a --compare result" in capsys.readouterr().err


def test_compare_refuses_a_file_without_a_summary(shipped, tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"records": []}))
    assert ship_prompter.main(["--compare", str(bad), "--root", str(shipped.parent), "--name", NAME]) == 2
    assert "holds no Evaluator summary" in capsys.readouterr().err
    partial = json.loads((shipped / BENCHMARK).read_text())["summary"]
    del partial["head_to_head"]["template"]
    bad.write_text(json.dumps({"summary": partial}))
    assert ship_prompter.main(["--compare", str(bad), "--root", str(shipped.parent), "--name", NAME]) == 2
    assert (
        "the summary has no 'vs the default instruction' under the independent judge"
        in capsys.readouterr().err
    )


# ---------------------------------------------------------------------------------------------- loading by name
def test_every_entry_point_loads_a_packaged_prompter_by_name(registry, capsys):
    from alignpro_plugins.cli import main
    from alignpro_plugins.serving.config import ServeConfig
    from alignpro_plugins.serving.server import load_prompter

    expected = Prompter.from_pretrained(registry, device="cpu", similarity=None)
    want = expected.rewrite_batch(PROMPTS[:1])
    expected.close()
    by_name = Prompter.from_pretrained(NAME.upper(), device="cpu", similarity=None)
    assert by_name.rewrite_batch(PROMPTS[:1]) == want
    by_name.close()

    served = load_prompter(ServeConfig(upstream="http://127.0.0.1:9/v1", prompter=NAME))
    assert served.rewrite_batch(PROMPTS[:1]) == want
    served.close()

    assert main(["rewrite", "--prompter", NAME, PROMPTS[0]]) == 0
    assert capsys.readouterr().out.strip() == want[0].strip()
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert f"{NAME:<24} {registry}" in out and f"(prompter, needs {BASE_ID})" in out


def test_langchain_and_dspy_load_a_packaged_prompter_by_name(registry):
    import dspy

    from alignpro_plugins.dspy import AlignProModule
    from alignpro_plugins.langchain import AlignProRunnable
    from alignpro_plugins.specs import classify_prompter_spec

    assert classify_prompter_spec(NAME) == "artifact"
    runnable = AlignProRunnable.from_pretrained(NAME, similarity=None)
    assert runnable.get_prompter().manifest == Manifest.load(registry)
    assert AlignProRunnable.from_spec(NAME).prompter_path == NAME
    module = AlignProModule(
        dspy.Predict("question -> answer"), prompter=NAME, prompter_kwargs={"similarity": None}
    )
    assert module.prompter_path == str(registry.resolve())
    assert module.prompter.manifest == Manifest.load(registry)


def test_an_unknown_name_lists_the_packaged_prompters(registry, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as err:  # a hub id that is not cached (the tests run offline)
        Prompter.from_pretrained("no-such-prompter", device="cpu")
    assert f"packaged prompters: '{NAME}'" in str(err.value)
    with pytest.raises(FileNotFoundError) as err:  # neither a folder, a packaged name nor a hub id
        Prompter.from_pretrained("no such prompter", device="cpu")
    message = str(err.value)
    assert "'no such prompter' is not a prompter artifact" in message and f"'{NAME}'" in message
    monkeypatch.setattr(prompters, "PACKAGE_DIR", tmp_path)  # an install that ships none
    with pytest.raises(FileNotFoundError, match="this install ships no packaged prompter"):
        Prompter.from_pretrained("no such prompter", device="cpu")


def test_a_packaged_prompter_missing_a_file_says_to_reinstall(shipped, tmp_path, monkeypatch):
    root = Path(shutil.copytree(shipped.parent, tmp_path / "prompters"))
    (root / NAME / "adapter_model.safetensors").unlink()
    monkeypatch.setattr(prompters, "PACKAGE_DIR", root)
    with pytest.raises(FileNotFoundError) as err:
        Prompter.from_pretrained(NAME, device="cpu")
    assert "lacks adapter_model.safetensors" in str(err.value) and "pip install --force-reinstall" in str(
        err.value
    )


def test_a_name_means_the_packaged_prompter_and_a_path_object_the_folder(
    registry, run, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(
        run, tmp_path / NAME, ignore=shutil.ignore_patterns("round-*")
    )  # a local folder of that name
    packaged = Prompter.from_pretrained(NAME, device="cpu", similarity=None)
    local = Prompter.from_pretrained(Path(NAME), device="cpu", similarity=None)
    try:
        assert "shipped" in packaged.manifest.provenance  # as a packaged model's name wins over a folder
        assert "shipped" not in local.manifest.provenance
    finally:
        packaged.close()
        local.close()


# ---------------------------------------------------------------------------------------------- the package
def test_the_package_index_and_its_folders_agree():
    """What index.json lists is there, byte for byte as shipped, and nothing unlisted ships."""
    listed = packaged_prompters()
    folders = {
        p.name for p in prompters.PACKAGE_DIR.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
    }
    assert folders == set(listed), "a prompter folder without an index entry, or an entry without its folder"
    for name, entry in listed.items():
        folder = packaged_prompter_folder(name)
        assert folder is not None and folder == entry.folder
        assert {p.name for p in folder.iterdir() if not p.name.startswith(".")} == set(entry.files)
        assert weights_hash(folder) == entry.weights_hash
        manifest = Manifest.load(folder)
        assert (manifest.base_model, manifest.base_model_hash) == (entry.base_model, entry.base_model_hash)
        assert manifest.has_adapter and not Path(manifest.base_model).is_absolute()
    if SHIPPED_PROMPTER in listed:
        assert listed[SHIPPED_PROMPTER].base_model == "smollm2-135m-instruct"


def test_the_package_data_patterns_cover_a_shipped_folder():
    # The line in [tool.setuptools.package-data] (read without tomllib, which Python 3.10 lacks).
    line = re.search(
        r'^"alignpro_plugins\.prompters" = (\[.*\])$', (ROOT / "pyproject.toml").read_text(), re.M
    )
    assert line is not None, "pyproject.toml lists no package data for alignpro_plugins.prompters"
    patterns = json.loads(line.group(1))
    names = [prompters.INDEX_NAME] + [f"{SHIPPED_PROMPTER}/{f}" for f in RUNTIME_FILES | {"tokenizer.json"}]
    names += [f"{n}/{f}" for n, e in packaged_prompters().items() for f in e.files]
    for name in names:
        assert any(fnmatch.fnmatch(name, p) for p in patterns), f"{name} would be left out of the wheel"


@pytest.mark.install
def test_the_wheel_carries_a_shipped_prompter(shipped, tmp_path):
    source = Path(
        shutil.copytree(
            ROOT,
            tmp_path / "src",
            ignore=shutil.ignore_patterns(".git", ".venv", "runs", "*.egg-info", "build"),
        )
    )
    target = source / "alignpro_plugins" / "prompters"
    for f in target.iterdir():  # the tiny shipped prompter instead of whatever this checkout ships
        if f.is_dir() and not f.name.startswith("_"):
            shutil.rmtree(f)
    shutil.copytree(shipped, target / NAME)
    shutil.copy2(shipped.parent / prompters.INDEX_NAME, target / prompters.INDEX_NAME)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "w"),
            str(source),
        ],
        check=True,
        cwd=tmp_path,
        timeout=600,
    )
    (wheel,) = (tmp_path / "w").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    in_wheel = {n.rsplit("/", 1)[1] for n in names if n.startswith(f"alignpro_plugins/prompters/{NAME}/")}
    assert in_wheel == RUNTIME_FILES
    assert "alignpro_plugins/prompters/index.json" in names


# ---------------------------------------------------------------------------------------------- the real one
@pytest.mark.real_models
def test_the_shipped_prompter_loads_by_name_from_the_installed_package_and_rewrites_offline(
    monkeypatch, tmp_path
):
    """The package's index lists the shipped prompter; it loads from the package (base-model check on) and
    rewrites offline."""
    import importlib.util
    import os

    monkeypatch.chdir(tmp_path)  # nothing from the checkout's working directory
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert SHIPPED_PROMPTER in packaged_prompters(), (
        "the package's index.json does not list the shipped prompter"
    )
    spec = importlib.util.find_spec("alignpro_plugins")
    assert spec is not None and spec.submodule_search_locations
    package = Path(next(iter(spec.submodule_search_locations))).resolve()
    folder = packaged_prompter_folder(SHIPPED_PROMPTER)
    assert folder is not None and folder.resolve().is_relative_to(package)
    prompter = Prompter.from_pretrained(SHIPPED_PROMPTER)  # verify_base on, no unverified base allowed
    try:
        assert prompter.manifest.base_model == "smollm2-135m-instruct"
        results = prompter.rewrite_results(["Explain how tides work.", "Write a short poem about tea."])
        assert any(r.rewritten and r.text != r.original for r in results), [
            r.fallback_reason for r in results
        ]
        if appends_guidance(prompter.manifest.mode):  # the prompt is kept byte for byte, guidance appended
            assert all(r.text.startswith(r.original) for r in results)
    finally:
        prompter.close()
