"""What a prompter given as a string or a path means: an artifact folder, a base-model folder or a model name.

Shared by the LangChain and DSPy adapters, so ``prompter="runs/prompter"`` is read the same way everywhere,
and a local folder that holds no prompter fails when it is given, not later as a confusing hub error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from alignpro_plugins.manifest import MANIFEST_NAME
from alignpro_plugins.models import PACKAGED_MODELS
from alignpro_plugins.prompters import packaged_prompters

PrompterSpecKind = Literal["artifact", "model_folder", "model_name"]

# A hub id: "name" or "org/name" (one slash, no leading dot or dash).
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_SEPARATORS = tuple(s for s in (os.sep, os.altsep) if s)


def _looks_local(spec: str | os.PathLike[str], path: Path) -> bool:
    """True when ``spec`` can only be meant as a local path (so it cannot be a hub id or packaged name)."""
    if not isinstance(spec, str):  # a pathlib.Path is always meant as a local path
        return True
    if path.exists() or path.is_absolute():
        return True
    if spec.startswith(("~", "./", "../")) or spec in (".", "..") or spec.endswith(_SEPARATORS):
        return True
    if not any(sep in spec for sep in _SEPARATORS):
        return False  # a bare name: a packaged model or a hub id
    norm = spec.replace(os.sep, "/")
    if not _HUB_ID.match(norm):
        return True  # e.g. runs/rl/prompter: a hub id has one slash at most
    # "org/name" is also how a relative folder looks: it is local when its first part is a local folder
    # (e.g. runs/prompter with runs/ present).
    return Path(norm.split("/", 1)[0]).is_dir()


def missing_prompter_message(spec: str | os.PathLike[str]) -> str:
    """Why ``spec`` is not a prompter folder, and what one holds."""
    path = Path(spec).expanduser()
    where = str(path.resolve())
    if not path.exists():
        problem = f"{where} does not exist"
    elif not path.is_dir():
        problem = f"{where} is a file, not a folder"
    else:
        problem = f"{where} has no {MANIFEST_NAME}"
    hub_hint = ""
    text = os.fspath(spec)
    if isinstance(spec, str) and _HUB_ID.match(text) and "/" in text:
        hub_hint = (
            f" If you meant the hub model {text!r}, give it as a base model explicitly (e.g. "
            f"AlignProRunnable(base_model={text!r}) or Prompter.from_base({text!r}))."
        )
    return (
        f"prompter {text!r} looks like a local folder, but {problem}. A prompter artifact folder holds "
        f"{MANIFEST_NAME} (plus adapter_config.json and adapter_model.safetensors when it has a LoRA "
        "adapter), as written by Prompter.save_pretrained(dir) or an `alignpro sft|rl` run; a base-model "
        f"folder holds config.json. Check the path (relative paths are read from {os.getcwd()}).{hub_hint}"
    )


def classify_prompter_spec(spec: str | os.PathLike[str]) -> PrompterSpecKind:
    """``artifact`` (a folder with alignpro.json, or the name of a prompter shipped in this package),
    ``model_folder`` (a folder with config.json: the base of a zero-shot prompter) or ``model_name`` (a packaged
    model name or a hub id, loaded later).

    Raises FileNotFoundError for anything meant as a local path that is neither folder: it exists, is
    absolute, starts with ``./``, ``../`` or ``~``, has more than one separator, or its first part is a local
    folder (``runs/prompter`` with ``runs/`` present; otherwise ``org/name`` is taken as a hub id).
    """
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"a prompter spec is a str or a path, got {type(spec).__name__}")
    if isinstance(spec, str) and spec.lower() in PACKAGED_MODELS:
        return "model_name"  # resolve_model reads packaged names before any folder
    if isinstance(spec, str) and spec.lower() in packaged_prompters():
        return "artifact"  # a trained prompter shipped in this package (Prompter.from_pretrained's names)
    path = Path(spec).expanduser()
    if (path / MANIFEST_NAME).is_file():
        return "artifact"
    if (path / "config.json").is_file():
        return "model_folder"
    if _looks_local(spec, path):
        raise FileNotFoundError(missing_prompter_message(spec))
    return "model_name"
