"""Trained prompters shipped inside this package, loaded by name.

Each one is an ordinary prompter artifact folder here, named as it is loaded::

    Prompter.from_pretrained("smollm2-135m-prompter")

``index.json`` lists them: per name, the base model it needs (with that model's weights hash), the files the
folder holds and the weights hash of its adapter, so an install that lost a file says so by name.
``benchmarks/ship_prompter.py`` writes a folder, its model card (the folder's ``README.md``) and its index entry
from a benchmark run; nothing else in this package writes here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The prompter the package ships for the packaged SmolLM2-135M-Instruct (the README's first example).
SHIPPED_PROMPTER = "smollm2-135m-prompter"
INDEX_NAME = "index.json"
PACKAGE_DIR = Path(__file__).resolve().parent
_REINSTALL = "pip install --force-reinstall --no-deps alignpro-plugins"


@dataclass(frozen=True)
class PackagedPrompter:
    name: str
    base_model: str  # a packaged model name or hub id (never a path of the machine that shipped it)
    base_model_hash: str
    weights_hash: str  # alignpro_plugins.manifest.weights_hash of the folder's adapter
    files: tuple[str, ...]
    description: str
    root: Path

    @property
    def folder(self) -> Path:
        return self.root / self.name

    def as_dict(self) -> dict[str, Any]:
        """The index entry (``root`` is where it was read, not part of it)."""
        return {
            "base_model": self.base_model,
            "base_model_hash": self.base_model_hash,
            "weights_hash": self.weights_hash,
            "files": list(self.files),
            "description": self.description,
        }


def packaged_prompters(root: Path | None = None) -> dict[str, PackagedPrompter]:
    """Every prompter ``index.json`` lists under ``root`` (default: this package's folder), by name."""
    root = root or PACKAGE_DIR
    path = root / INDEX_NAME
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {
        name: PackagedPrompter(
            name=name,
            base_model=entry["base_model"],
            base_model_hash=entry["base_model_hash"],
            weights_hash=entry["weights_hash"],
            files=tuple(entry["files"]),
            description=entry["description"],
            root=root,
        )
        for name, entry in data.items()
    }


def packaged_prompter_folder(name: str, root: Path | None = None) -> Path | None:
    """The installed folder of the packaged prompter ``name`` (any case), or None when no prompter has that name.

    A listed prompter whose folder lacks a file it shipped with is a broken install: a ``FileNotFoundError``
    names the files and how to reinstall.
    """
    prompter = packaged_prompters(root).get(name.lower())
    if prompter is None:
        return None
    missing = [f for f in prompter.files if not (prompter.folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"The packaged prompter {prompter.name!r} is incomplete in this install: {prompter.folder} lacks "
            f"{', '.join(missing)}. Reinstall the package: {_REINSTALL}"
        )
    return prompter.folder


def packaged_names_hint(root: Path | None = None) -> str:
    """What a user can load by name instead, for an error message."""
    names = sorted(packaged_prompters(root))
    if not names:
        return "this install ships no packaged prompter"
    return "packaged prompters: " + ", ".join(repr(n) for n in names) + " (alignpro models lists them)"


def describe_prompters(root: Path | None = None) -> list[dict[str, str]]:
    """One row per packaged prompter for ``alignpro models``: its folder, or why it cannot load."""
    rows = []
    for prompter in packaged_prompters(root).values():
        row = {"name": prompter.name, "description": prompter.description, "base_model": prompter.base_model}
        try:
            row["path"], row["status"] = str(packaged_prompter_folder(prompter.name, root)), "ok"
        except FileNotFoundError as exc:
            row["path"], row["status"] = "", str(exc)
        rows.append(row)
    return rows
