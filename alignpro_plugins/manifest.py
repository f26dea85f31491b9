"""The prompter artifact: a PEFT adapter folder plus ``alignpro.json``.

The manifest makes the folder self-describing (like PEFT's ``adapter_config.json``): which base model it
needs (name and a content hash of the weights), how queries are formatted, how to generate, which mode to
use, and where it came from. It is plain JSON; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST_NAME = "alignpro.json"
MODES = ("augment", "rewrite")

DEFAULT_SYSTEM = "You improve requests that users send to an AI assistant. You never answer them yourself."
DEFAULT_INSTRUCTIONS = {
    "augment": (
        "Write one or two sentences of guidance telling the assistant how to answer the request below well: "
        "what to cover, the format and the level of detail. Do not answer the request.\n\nRequest:\n{prompt}"
    ),
    "rewrite": (
        "Rewrite the request below so that an AI assistant gives a better answer. Keep every detail, name, "
        "number and quoted text. Output only the rewritten request.\n\nRequest:\n{prompt}"
    ),
}


@dataclass
class GenerationDefaults:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    repetition_penalty: float = 1.05


@dataclass
class Manifest:
    base_model: str
    base_model_hash: str | None = None
    mode: str = "augment"
    system_prompt: str = DEFAULT_SYSTEM
    instructions: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_INSTRUCTIONS))
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    guard: dict[str, Any] = field(default_factory=dict)
    similarity_model: str | None = "all-minilm-l6-v2"
    has_adapter: bool = False
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for mode, text in self.instructions.items():
            if "{prompt}" not in text:
                raise ValueError(f"instruction template for mode {mode!r} must contain '{{prompt}}'")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{MANIFEST_NAME} has format_version {version}; this alignpro-plugins reads up to "
                f"{FORMAT_VERSION}. Upgrade with: pip install -U alignpro-plugins"
            )
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["generation"] = GenerationDefaults(**data.get("generation", {}))
        return cls(**known)

    def save(self, folder: str | os.PathLike[str]) -> Path:
        path = Path(folder) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike[str]) -> Manifest:
        path = Path(folder) / MANIFEST_NAME
        if not path.exists():
            raise FileNotFoundError(
                f"{folder} is not a prompter artifact: {MANIFEST_NAME} is missing. Create one with "
                "Prompter.from_base(...).save_pretrained(dir) or any `alignpro sft|rl` run."
            )
        return cls.from_dict(json.loads(path.read_text()))


def weights_hash(model_dir: str | os.PathLike[str]) -> str:
    """sha256 over the model's weight files (safetensors / bin names sorted), cached by size and mtime (ns)."""
    folder = Path(model_dir)
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors) in {folder}")
    # Nanosecond mtimes: a same-size rewrite within the same second must not reuse a stale hash.
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    cache = folder / ".alignpro-weights-hash.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("stamp") == [list(s) for s in stamp]:
            return str(cached["sha256"])
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    value = "sha256:" + digest.hexdigest()
    try:
        cache.write_text(json.dumps({"stamp": stamp, "sha256": value}))
    except OSError:
        pass  # read-only model folder: hash again next time
    return value
