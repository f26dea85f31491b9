"""The core install: a prompter loads and rewrites without the training, plotting, GGUF or serving packages, and
a feature whose extra is missing says exactly what to install."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from alignpro_plugins.prompter import Prompter
from alignpro_plugins.testing import build_tiny_prompter
from tests import servers

ROOT = Path(__file__).resolve().parents[1]
# Installed only by extras: none of them may come with `pip install alignpro-plugins`.
EXTRA_ONLY = (
    "trl",
    "datasets",
    "accelerate",
    "matplotlib",
    "gguf",
    "fastapi",
    "uvicorn",
    "langchain_core",
    "dspy",
)
PROMPTS = ["What is tea?", "Write a poem about the sea.", "Explain recursion in one line."]

# Makes the named top-level packages unimportable, as in an environment where they are not installed.
BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = set(sys.argv[1].split(","))
    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, Blocker())
    """
)


def run_without(blocked: str, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code), blocked],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("blocked", "statement", "extra"),
    [
        ("trl", "import trainers", "train"),
        ("datasets", "import trainers.sft_config", "train"),
        ("langchain_core", "import alignpro_plugins.langchain", "langchain"),
        ("dspy", "import alignpro_plugins.dspy", "dspy"),
        (
            "matplotlib",
            "from alignpro_plugins.evaluation import plot_distributions; plot_distributions({}, [], None)",
            "eval",
        ),
    ],
)
def test_a_missing_extra_names_the_command_that_installs_it(blocked, statement, extra):
    out = run_without(
        blocked,
        f"""
        from alignpro_plugins.extras import MissingExtraError
        try:
            {statement}
        except MissingExtraError as exc:
            print("MISSING:", exc)
        """,
    )
    assert out.returncode == 0, out.stderr
    assert f"pip install 'alignpro-plugins[{extra}]'" in out.stdout, out.stdout


def test_the_cli_reports_a_missing_extra_in_one_line():
    out = run_without(
        "trl",
        """
        import sys
        from alignpro_plugins.cli import main
        sys.exit(main(["sft", "--help"]))
        """,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr  # no traceback
    assert lines[0].startswith("alignpro sft: error:") and "pip install 'alignpro-plugins[train]'" in lines[0]


def test_the_core_still_imports_and_a_broken_dependency_keeps_its_own_error():
    out = run_without(
        "trl,datasets,accelerate,matplotlib,gguf,fastapi,uvicorn,langchain_core,dspy",
        """
        import alignpro_plugins, alignpro_plugins.prompter, alignpro_plugins.targets, alignpro_plugins.cli
        from alignpro_plugins.extras import require
        try:
            require("json.not_a_module", "x")
        except ModuleNotFoundError as exc:
            print(type(exc).__name__)
        """,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ModuleNotFoundError"


def light_venv() -> Path:
    """A virtual environment with `pip install <this checkout>` and no extras, built once per dependency set
    (the package itself is reinstalled on every run, without touching the dependencies)."""
    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:12]
    venv = servers.test_cache() / f"light-install-{key}"
    stamp = venv / ".alignpro-installed"
    python = venv / "bin" / "python"
    with servers.file_lock(servers.test_cache() / "light-install.lock"):
        # pip builds in the source folder: a copy keeps build/ and *.egg-info out of the checkout.
        source = servers.test_cache() / "light-install-source"
        shutil.rmtree(source, ignore_errors=True)
        shutil.copytree(
            ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "*.egg-info", "build")
        )
        pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        if not stamp.exists():
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            # The CPU build first, so that resolving the package never picks a GPU build of torch.
            subprocess.run([*pip, "torch==2.13.0"], check=True, timeout=1200)
            subprocess.run([*pip, str(source)], check=True, timeout=1200)
            stamp.write_text(key)
        else:
            subprocess.run([*pip, "--no-deps", "--force-reinstall", str(source)], check=True, timeout=600)
    return python


@pytest.mark.install
def test_the_core_install_loads_a_trained_prompter_and_rewrites_offline(tmp_path):
    folder, _ = build_tiny_prompter(tmp_path)
    expected = Prompter.from_pretrained(folder, device="cpu", similarity=None).rewrite_batch(PROMPTS)

    python = light_venv()
    script = textwrap.dedent(
        f"""
        import importlib.util, json
        from alignpro_plugins import Prompter
        present = [m for m in {EXTRA_ONLY!r} if importlib.util.find_spec(m) is not None]
        prompter = Prompter.from_pretrained({str(folder)!r}, device="cpu", similarity=None)
        print(json.dumps({{"present": present, "rewrites": prompter.rewrite_batch({PROMPTS!r})}}))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run(
        [str(python), "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["present"] == [], f"installed without an extra: {result['present']}"
    assert result["rewrites"] == expected

    # The command line works too, and a training command says what to install.
    alignpro = python.parent / "alignpro"
    assert (
        subprocess.run([str(alignpro), "--help"], capture_output=True, env=env, cwd=tmp_path).returncode == 0
    )
    sft = subprocess.run(
        [str(alignpro), "sft", "--help"], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert sft.returncode == 2 and "pip install 'alignpro-plugins[train]'" in sft.stderr, sft.stderr
