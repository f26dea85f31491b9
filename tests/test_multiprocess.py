"""The RL stage under `accelerate launch` with two CPU processes, as docs/recipes/scale-out.md runs it.

The launched command is the recipe's (``examples/recipes/scale_out_rl.yaml``, its frozen target served over the
OpenAI-compatible API), with flags that swap in a tiny SFT prompter, a tiny reward model and a loopback target
server, and cut the budget to 2 steps. Each launch starts two real training processes (gloo on the CPU), so the
file takes about a minute on 2 cores.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from alignpro_plugins.prompter import Prompter
from tests.openai_server import OpenAIServer
from trainers.arguments import join_cpu_process_group
from trainers.kl_optimum_config import KLOptimumConfig
from trainers.oracle_config import KLOptimumOracleConfig
from trainers.sft_config import AlignProSFTConfig
from trainers.sft_trainer import AlignProSFTTrainer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "examples" / "recipes" / "scale_out_rl.yaml"
PROMPTS = [
    "write a poem about the sea",
    "what are the benefits of green tea?",
    "explain python code",
    "list three numbers",
    "give two examples of good answers",
    "how do i write a function?",
]
# The recipe's launch on a machine without a GPU: `--multi_gpu` is what makes accelerate start the processes
# (torchrun); the trainers then train on the CPU over gloo.
LAUNCH = [
    "launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "--main_process_port",
    "0",  # a free port: other test sessions may be launching too
    "-m",
    "alignpro_plugins.cli",
    "rl",
]
# The recipe at test size: two processes x 2 completions x 2 steps; 2 rewrites of each of 2 prompts a step.
TINY = [
    "--max_steps",
    "2",
    "--num_generations",
    "2",
    "--per_device_train_batch_size",
    "2",
    "--max_completion_length",
    "6",
    "--target_max_new_tokens",
    "8",
    "--learning_rate",
    "1e-2",
    "--beta",
    "0.1",
    "--save_steps",
    "1000",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
]


@pytest.fixture(scope="module")
def inputs(tiny_lm_dir, tiny_encoder_dir, tmp_path_factory) -> SimpleNamespace:
    """A tiny SFT prompter, a tiny reward model and the training prompts, in a fresh folder."""
    root = tmp_path_factory.mktemp("multiprocess")
    cfg = AlignProSFTConfig(
        output_dir=str(root / "sft"),
        base_model=tiny_lm_dir,
        max_steps=2,
        per_device_train_batch_size=2,
        report_to="none",
        save_steps=1000,
        disable_tqdm=True,
        fit_check_prompts=0,
    )
    AlignProSFTTrainer(cfg, pairs=[(p, "Be thorough.") for p in PROMPTS]).train()
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return SimpleNamespace(root=root, sft=root / "sft", reward=tiny_encoder_dir, prompts=prompts)


def recipe_flags(inputs: SimpleNamespace, output_dir: Path) -> list[str]:
    """The recipe file, with the tiny models and prompts in place of its own."""
    return [
        "--config",
        str(RECIPE),
        "--output_dir",
        str(output_dir),
        "--sft_prompter",
        str(inputs.sft),
        "--reward_model",
        str(inputs.reward),
        "--prompts_data",
        str(inputs.prompts),
    ]


def accelerate_launch(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",  # two processes on two cores
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    accelerate = Path(sys.executable).with_name("accelerate")
    return subprocess.run(
        [str(accelerate), *LAUNCH, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _failed(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"


def test_grpo_trains_across_two_processes_with_kl_to_the_sft_prompter(inputs):
    out = inputs.root / "grpo"
    with OpenAIServer(model_name="target") as server:  # the recipe's target_model_name
        proc = accelerate_launch(
            [*recipe_flags(inputs, out), "--target_base_url", server.base_url, *TINY], inputs.root
        )
    assert proc.returncode == 0, _failed(proc)

    # Both processes asked the target, each through its own answer cache.
    assert (out / "target_cache.jsonl").exists() and (out / "target_cache.rank1.jsonl").exists()
    answered = [r.body["messages"][-1]["content"] for r in server.requests]
    originals = {x for x in PROMPTS for a in answered if a.startswith(x)}
    # One job, not two copies: each step's 2 prompts were split between the processes, so 2 steps saw 4.
    assert len(originals) == 4, answered

    # The metrics were written once (by the main process), with the global batch of both processes.
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert steps[-1]["epoch"] == pytest.approx(4 / len(PROMPTS))
    # beta > 0: the KL to the frozen `ref` copy of the SFT adapter, nonzero once the policy has moved.
    assert steps[0]["kl"] == 0 and steps[-1]["kl"] > 0

    # One artifact, trained away from the SFT adapter (and without the frozen `ref` copy); it loads as a prompter.
    sft = load_file(str(inputs.sft / "adapter_model.safetensors"))
    tuned = load_file(str(out / "adapter_model.safetensors"))
    assert sft.keys() == tuned.keys()
    assert any(not torch.equal(sft[k], tuned[k]) for k in sft)
    prompter = Prompter.from_pretrained(out, similarity=None)
    assert isinstance(prompter.rewrite(PROMPTS[0]), str)
    stage = prompter.manifest.provenance["stages"][-1]
    assert (stage["stage"], stage["algorithm"], stage["beta"], stage["steps"]) == ("rl", "grpo", 0.1, 2)
    # The provenance counts every process's target calls, and says how many processes there were.
    assert stage["processes"] == 2
    assert stage["target_calls"] == len(server.requests)


def test_kl_optimum_refuses_a_multi_process_launch(inputs):
    out = inputs.root / "kl"
    # Refused while its config is read: before any model loads or the recipe's target is called.
    proc = accelerate_launch([*recipe_flags(inputs, out), "--algorithm", "kl-optimum"], inputs.root)
    assert proc.returncode != 0
    assert (
        "alignpro rl: error: kl-optimum runs as one process, but this run was launched as 2" in proc.stderr
    ), _failed(proc)
    assert "--algorithm grpo" in proc.stderr
    assert not (out / "alignpro.json").exists() and not list(out.glob("round-*"))


def test_kl_optimum_configs_name_the_launch_they_refuse(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"launched as 2 processes.*`alignpro rl --algorithm kl-optimum`"):
        KLOptimumConfig(output_dir="o", report_to="none")
    with pytest.raises(ValueError, match=r"`alignpro oracle --algorithm kl-optimum` without a launcher"):
        KLOptimumOracleConfig(output_dir="o", report_to="none")


def test_a_cpu_launch_joins_the_process_group_over_gloo(monkeypatch):
    """Without use_cpu, transformers ignores a launcher's process group on a machine without a GPU: each process
    would train alone on all the data and write output_dir."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = SimpleNamespace(use_cpu=False, ddp_backend=None)
    join_cpu_process_group(cfg)
    assert (cfg.use_cpu, cfg.ddp_backend) == (True, "gloo")
    chosen = SimpleNamespace(use_cpu=False, ddp_backend="mpi")
    join_cpu_process_group(chosen)
    assert chosen.ddp_backend == "mpi"  # a backend the user chose is kept


def test_accelerate_cpu_launch_of_one_process_says_how_to_start_several(monkeypatch, caplog):
    """`accelerate launch --cpu --num_processes 2` (no mpirun) starts one process with MASTER_ADDR set."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    cfg = SimpleNamespace(use_cpu=False, ddp_backend=None)
    with caplog.at_level(logging.WARNING, logger="trainers.arguments"):
        join_cpu_process_group(cfg)
    assert "accelerate launch --multi_gpu --num_processes N" in caplog.text
    assert cfg.use_cpu is False  # one process: nothing to join
    caplog.clear()
    monkeypatch.delenv("MASTER_ADDR")  # `--num_processes 1`: nothing to say
    with caplog.at_level(logging.WARNING, logger="trainers.arguments"):
        join_cpu_process_group(cfg)
    assert not caplog.text
