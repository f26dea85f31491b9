"""``alignpro export``: a prompter as a standalone model that any server runs.

The LoRA adapter is merged into its base model and saved as a plain transformers folder (safetensors,
tokenizer, generation defaults) whose chat template reproduces :meth:`Prompter.format_query` exactly: a chat
request whose latest user message is a prompt is formatted as the prompter formats it, so vLLM, transformers
or llama.cpp (through the optional GGUF file) give the prompter's rewrite as the answer. ``alignpro_export.json``
keeps the manifest (mode, guard, generation settings) that a remote prompter applies to what the server returns.

The GGUF file is written by llama.cpp's own converter (``convert_hf_to_gguf.py``), taken from the
llama-cpp-python source distribution on PyPI (its vendored llama.cpp) or from a llama.cpp checkout you name.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from alignpro_plugins.artifact import artifact_folder
from alignpro_plugins.chat_template import (
    check_chat_template,
    checked_chat_template,
    query_template,
    save_tokenizer,
)
from alignpro_plugins.manifest import DTYPES, MODES, Manifest, portable_base_name, weights_hash
from alignpro_plugins.models import cache_dir, file_lock

logger = logging.getLogger(__name__)

EXPORT_MANIFEST = "alignpro_export.json"
EXPORT_FORMAT_VERSION = 1
# The llama-cpp-python release whose vendored llama.cpp converter `--gguf` uses (its sdist ships the script).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    gguf: Path | None = None


def export_prompter(
    prompter_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    base_model: str | None = None,
    mode: str | None = None,
    dtype: str = "float32",
    gguf: bool = False,
    gguf_outtype: str = "f32",
    gguf_converter: str | os.PathLike[str] | None = None,
) -> ExportResult:
    """Merge the prompter in ``prompter_dir`` into a standalone model folder ``out_dir`` (and a GGUF file).

    ``mode`` picks the instruction template the chat template bakes in (default: the manifest's mode).
    ``out_dir`` must not exist or be empty; it is written completely or not at all.
    """
    from transformers import AutoTokenizer

    from alignpro_plugins.prompter import Prompter

    out = Path(out_dir)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    if gguf_outtype not in GGUF_OUTTYPES:
        raise ValueError(f"gguf_outtype must be one of {list(GGUF_OUTTYPES)}, got {gguf_outtype!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new --out folder")
    folder = artifact_folder(prompter_dir)  # a hub id is downloaded once, here
    manifest = Manifest.load(folder)
    mode = mode or manifest.mode
    if mode not in MODES or mode not in manifest.instructions:
        raise ValueError(
            f"mode {mode!r} cannot be exported: {folder}/alignpro.json has instruction templates for "
            f"{sorted(manifest.instructions)}"
        )
    converter = _gguf_converter(gguf_converter) if gguf else None  # before minutes of merging
    prompter = Prompter.from_pretrained(
        folder, base_model=base_model, device="cpu", dtype=dtype, similarity=None
    )
    from alignpro_plugins.lora import merge_lora  # torch: not for a remote prompter reading EXPORT_MANIFEST

    model = merge_lora(prompter.model)  # loaded for inference: the adapter, if any, is alignpro's LoRA
    base_template = query_template(prompter.tokenizer)

    def format_query(prompt: str, answer: str | None = None) -> str:
        return prompter.format_query(prompt, mode, answer=answer)

    template = checked_chat_template(prompter.tokenizer, manifest, mode, format_query)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        save_tokenizer(prompter.tokenizer, template, tmp)
        _write_generation_config(tmp, model, manifest)
        # The files as saved (a server reads those) still format a user message as the prompter's query.
        check_chat_template(AutoTokenizer.from_pretrained(str(tmp)), format_query, refine=mode == "refine")
        exported = replace(manifest, mode=mode, has_adapter=False, query_chat_template=base_template or "")
        info = {
            "format_version": EXPORT_FORMAT_VERSION,
            "mode": mode,
            "manifest": exported.as_dict(),
            # The template Prompter.format_query renders with (the tokenizer's own one was replaced), so a
            # remote prompter formats queries locally exactly as the adapter did.
            "query_chat_template": base_template,
            "source": {
                "base_model": portable_base_name(manifest.base_model),
                "base_model_hash": manifest.base_model_hash,
                "adapter_weights": weights_hash(folder) if manifest.has_adapter else None,
            },
        }
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(info, indent=2, ensure_ascii=False))
        gguf_file = None
        if converter is not None:
            gguf_file = _convert_to_gguf(converter, tmp, tmp / f"prompter.{gguf_outtype}.gguf", gguf_outtype)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        prompter.close()
    return ExportResult(out, out / gguf_file.name if gguf_file else None)


def _write_generation_config(folder: Path, model: Any, manifest: Manifest) -> None:
    """The prompter's decoding defaults, for clients that send none (transformers' generate, vLLM)."""
    gen = manifest.generation
    config = model.generation_config
    config.max_new_tokens = gen.max_new_tokens
    config.do_sample = gen.do_sample
    config.repetition_penalty = gen.repetition_penalty
    if gen.do_sample:
        config.temperature, config.top_p = gen.temperature, gen.top_p
    else:  # greedy: sampling knobs would only draw warnings
        config.temperature = config.top_p = config.top_k = None
    config.save_pretrained(str(folder))


# ---------------------------------------------------------------------------------------------- GGUF
def _gguf_converter(path: str | os.PathLike[str] | None) -> Path:
    """llama.cpp's ``convert_hf_to_gguf.py``: the one given, else the copy cached from llama-cpp-python's sdist."""
    if importlib.util.find_spec("sentencepiece") is None:
        raise ModuleNotFoundError(
            "--gguf runs llama.cpp's converter, which imports sentencepiece; install it with: "
            "pip install 'alignpro-plugins[serve]' (or pip install sentencepiece)"
        )
    if path is not None:
        script = Path(path)
        if script.is_dir():
            script = script / "convert_hf_to_gguf.py"
        if not script.is_file():
            raise FileNotFoundError(
                f"{path}: not llama.cpp's convert_hf_to_gguf.py (or a llama.cpp checkout holding it)"
            )
        return script
    folder = cache_dir() / f"llama.cpp-convert-{LLAMA_CPP_PYTHON_VERSION}"
    script = folder / "convert_hf_to_gguf.py"
    if not script.is_file():
        with file_lock(cache_dir() / ".llama.cpp-convert.lock"):
            if not script.is_file():
                _fetch_converter(folder)
    return script


def _fetch_converter(folder: Path) -> None:
    """Extract llama.cpp's converter (script, ``conversion/``, ``gguf-py/``) from the llama-cpp-python sdist."""
    spec = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
    with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec, "-d", tmp]
        logger.warning("fetching llama.cpp's GGUF converter from the %s source distribution (once)", spec)
        run = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if run.returncode != 0 or not archives:
            raise RuntimeError(
                f"could not download {spec} (the source of llama.cpp's converter): {run.stderr[-800:]}\n"
                "Offline? Pass --gguf-converter PATH to convert_hf_to_gguf.py of a llama.cpp checkout."
            )
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        staging = Path(tmp) / "converter"
        with tarfile.open(archives[0]) as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(wanted)
            ]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(staging, members=members, filter="data")
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise RuntimeError(f"{archives[0].name} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
        os.replace(staging, folder)


def _convert_to_gguf(converter: Path, model_dir: Path, out_file: Path, outtype: str) -> Path:
    """Run the converter in a subprocess, with its own gguf-py first on the path (it may be newer than ours)."""
    env = dict(os.environ)
    gguf_py = converter.parent / "gguf-py"
    if gguf_py.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(gguf_py), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(converter), str(model_dir), "--outfile", str(out_file), "--outtype", outtype]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if run.returncode != 0 or not out_file.is_file():
        tail = "\n".join((run.stderr or run.stdout).strip().splitlines()[-6:])
        raise RuntimeError(
            f"llama.cpp's converter could not write a GGUF file for this model (the merged folder itself is "
            f"fine; export again without --gguf to keep it):\n{tail}"
        )
    return out_file


# ---------------------------------------------------------------------------------------------- command
def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompter", help="prompter artifact folder (alignpro.json + adapter) or its hub id")
    p.add_argument("--out", required=True, help="new folder for the merged model")
    p.add_argument("--gguf", action="store_true", help="also write a GGUF file (llama.cpp's converter)")
    p.add_argument("--gguf-outtype", default="f32", choices=GGUF_OUTTYPES, help="GGUF tensor type")
    p.add_argument(
        "--gguf-converter",
        help="convert_hf_to_gguf.py of a llama.cpp checkout (default: llama-cpp-python's, fetched once with pip)",
    )
    p.add_argument(
        "--mode", choices=list(MODES), help="the mode baked into the chat template (default: the manifest's)"
    )
    p.add_argument("--dtype", default="float32", choices=list(DTYPES), help="dtype of the saved weights")
    p.add_argument(
        "--prompter-base",
        help="base model folder or name, when the folder alignpro.json records has moved (its hash is checked)",
    )


def cmd_export(args: argparse.Namespace) -> int:
    result = export_prompter(
        args.prompter,
        args.out,
        base_model=args.prompter_base,
        mode=args.mode,
        dtype=args.dtype,
        gguf=args.gguf,
        gguf_outtype=args.gguf_outtype,
        gguf_converter=args.gguf_converter,
    )
    print(f"merged model: {result.folder}")
    if result.gguf is not None:
        print(f"GGUF file: {result.gguf}")
    return 0
