"""The prompter artifact: a PEFT adapter folder plus ``alignpro.json`` (and, from format 2, the tokenizer).

The manifest makes the folder self-describing (like PEFT's ``adapter_config.json``): which base model it
needs (a portable name: a packaged model name or hub id, and a content hash of the weights), how queries are
formatted, how to generate, which mode to use, and where it came from. It is plain JSON; nothing is ever
unpickled.

Format 2 adds ``query_chat_template``: the folder's tokenizer then carries a chat template that renders a user
message as the prompter's query (for plain transformers, vLLM or llama.cpp), and ``query_chat_template`` is
the template the prompter itself renders its query with ("" for the plain format). Format 1 readers would use
the folder's template for the query, hence the new version.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from alignpro_plugins.guard import GuardConfig
from alignpro_plugins.models import PACKAGED_MODELS

FORMAT_VERSION = 2
MANIFEST_NAME = "alignpro.json"
MODES = ("augment", "rewrite", "refine")
# Modes whose output is guidance appended to x ("" = no change): the guard and the target's input treat them alike.
GUIDANCE_MODES = ("augment", "refine")
DTYPES = ("float32", "bfloat16", "float16")  # what `dtype=` accepts besides "auto" and a torch.dtype
_BASE = "the base model's name, hub id or folder (a non-empty string)"


def check_dtype(value: object, what: str = "dtype") -> None:
    """Refuse a dtype name outside "auto" and DTYPES, naming what is accepted."""
    if value not in ("auto", *DTYPES):
        raise ValueError(f"{what} must be 'auto' or one of {list(DTYPES)}, got {value!r}")


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


# The refinement prompter's meta-prompt: the request and the frozen model's first answer (clipped to the manifest's
# refine_answer_tokens), and the guidance that names what that answer lacked. Not in DEFAULT_INSTRUCTIONS: a
# prompt-only manifest stays as it was; a refine-mode manifest gets it when it has no template of its own.
DEFAULT_REFINE_INSTRUCTION = (
    "Below are a request and an AI assistant's first answer to it. Write one or two sentences of guidance "
    "telling the assistant what its answer lacked and how to answer the request better: what to add, fix, "
    "cover or format differently. Do not answer the request.\n\nRequest:\n{prompt}\n\nFirst answer:\n{answer}"
)
DEFAULT_REFINE_ANSWER_TOKENS = 256
# The slots of a refine template, filled in one pass (a prompt holding "{answer}" stays as it is).
REFINE_SLOTS = re.compile(r"\{(prompt|answer)\}")


def fill_refine_template(template: str, prompt: str, answer: str) -> str:
    """A refine instruction with its ``{prompt}`` and ``{answer}`` slots filled."""
    return REFINE_SLOTS.sub(lambda m: prompt if m.group(1) == "prompt" else answer, template)


def appends_guidance(mode: str) -> bool:
    """Whether ``mode``'s output is guidance appended to x (augment, refine) rather than a rewrite replacing it."""
    return mode in GUIDANCE_MODES


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    # NaN and infinity parse from JSON ("NaN") but make every comparison in the guard meaningless.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# Per field: (the check, what is accepted). A manifest value outside these would make every prompt fail or
# fall back at run time, so it is refused when the manifest is built or loaded.
Rule = tuple[Any, str]
GENERATION_RULES: dict[str, Rule] = {
    "max_new_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "do_sample": (lambda v: isinstance(v, bool), "true or false"),
    "temperature": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "repetition_penalty": (lambda v: _is_number(v) and v > 0, "a number > 0"),
}
GUARD_RULES: dict[str, Rule] = {
    "max_length_ratio": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "max_length_slack": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "min_similarity": (lambda v: _is_number(v) and -1 <= v <= 1, "a number in [-1, 1] (a cosine similarity)"),
    "check_protected_spans": (lambda v: isinstance(v, bool), "true or false"),
}
_HASH = re.compile(r"sha256:[0-9a-f]{64}")


def check_value(name: str, value: object, rule: Rule) -> None:
    """Raise a ValueError naming the field, the value (and its type) and what is accepted."""
    ok, accepted = rule
    if not ok(value):
        raise ValueError(f"{name} must be {accepted}, got {value!r} ({type(value).__name__})")


@dataclass
class GenerationDefaults:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.95
    repetition_penalty: float = 1.05

    def __post_init__(self) -> None:
        for name, rule in GENERATION_RULES.items():
            check_value(f"generation.{name}", getattr(self, name), rule)


def _check_keys(what: str, given: Mapping[str, Any], accepted: list[str]) -> None:
    unknown = [k for k in given if k not in accepted]
    if unknown:
        raise ValueError(
            f"unknown {what} {', '.join(repr(k) for k in unknown)}; accepted keys: {', '.join(accepted)}"
        )


def check_generation_kwargs(kwargs: Mapping[str, Any]) -> None:
    """Raise a ValueError naming every key that is not a ``GenerationDefaults`` field, and the accepted keys.

    ``Prompter`` calls it on per-call overrides and on a manifest's ``generation`` object.
    """
    _check_keys("generation setting(s)", kwargs, [f.name for f in fields(GenerationDefaults)])


def available_modes(instructions: Mapping[str, str]) -> list[str]:
    """The modes a manifest can run: known modes that have an instruction template."""
    return [m for m in MODES if m in instructions]


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
    # The chat template format_query renders with ("" = the plain format); None = the tokenizer's own as loaded.
    query_chat_template: str | None = None
    format_version: int = FORMAT_VERSION
    # Refine mode: how many tokens of the first answer the meta-prompt shows (None: not a refinement prompter).
    # Written only when set, so a prompt-only manifest reads and writes as before.
    refine_answer_tokens: int | None = None

    def __post_init__(self) -> None:
        check_value("base_model", self.base_model, (lambda v: isinstance(v, str) and v.strip(), _BASE))
        check_value(
            "base_model_hash",
            self.base_model_hash,
            (
                lambda v: v is None or isinstance(v, str) and _HASH.fullmatch(v),
                "null or 'sha256:' + 64 hex digits",
            ),
        )
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        check_value(
            "system_prompt", self.system_prompt, (lambda v: isinstance(v, str), "a string (may be empty)")
        )
        if not isinstance(self.instructions, dict):
            raise ValueError(
                f"instructions must map a mode to its template, got {type(self.instructions).__name__}"
            )
        unknown = [m for m in self.instructions if m not in MODES]
        if unknown:
            raise ValueError(
                f"instructions has templates for unknown mode(s) {unknown}; known modes: {list(MODES)}"
            )
        if self.mode == "refine" and "refine" not in self.instructions:
            self.instructions = {**self.instructions, "refine": DEFAULT_REFINE_INSTRUCTION}
        if "refine" in self.instructions and self.refine_answer_tokens is None:
            self.refine_answer_tokens = DEFAULT_REFINE_ANSWER_TOKENS
        for mode, text in self.instructions.items():
            if not isinstance(text, str) or "{prompt}" not in text:
                raise ValueError(f"instruction template for mode {mode!r} must contain '{{prompt}}'")
            if mode == "refine" and "{answer}" not in text:
                raise ValueError(
                    "instruction template for mode 'refine' must contain '{answer}' (where the first answer goes) "
                    "as well as '{prompt}'"
                )
        check_value(
            "refine_answer_tokens",
            self.refine_answer_tokens,
            (
                lambda v: v is None or _is_int(v) and v >= 1,
                "null or an integer >= 1 (tokens of the first answer)",
            ),
        )
        # Caught here, not per prompt: without a template every prompt would fall back with a bare KeyError.
        if self.mode not in self.instructions:
            raise ValueError(
                f"mode {self.mode!r} has no instruction template; instructions has templates for modes: "
                f"{available_modes(self.instructions)}"
            )
        if not isinstance(self.guard, dict):
            raise ValueError(f"guard must be an object of guard settings, got {type(self.guard).__name__}")
        _check_keys("guard setting(s)", self.guard, [f.name for f in fields(GuardConfig)])
        for name, value in self.guard.items():
            check_value(f"guard.{name}", value, GUARD_RULES[name])
        if not isinstance(self.generation, GenerationDefaults):
            raise ValueError(f"generation must be GenerationDefaults, got {type(self.generation).__name__}")
        check_value(
            "similarity_model",
            self.similarity_model,
            (
                lambda v: v is None or isinstance(v, str) and v.strip(),
                "null or a model name, hub id or folder",
            ),
        )
        check_value("has_adapter", self.has_adapter, (lambda v: isinstance(v, bool), "true or false"))
        check_value("provenance", self.provenance, (lambda v: isinstance(v, dict), "an object"))
        check_value(
            "query_chat_template",
            self.query_chat_template,
            (lambda v: v is None or isinstance(v, str), "null or a chat template string"),
        )

    def as_dict(self) -> dict[str, Any]:
        """The manifest as JSON data; ``refine_answer_tokens`` only when set (a prompt-only manifest is unchanged)."""
        data = asdict(self)
        if data["refine_answer_tokens"] is None:
            del data["refine_answer_tokens"]
        return data

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, ensure_ascii=False)

    def for_mode(self, mode: str) -> Manifest:
        """This manifest running ``mode`` (a refine mode gets the default meta-prompt if it has none)."""
        return replace(self, mode=mode, instructions=dict(self.instructions))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """From parsed JSON; a ValueError says what is wrong. Unknown top-level keys are ignored."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version", FORMAT_VERSION)
        check_value("format_version", version, (_is_int, "an integer"))
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{MANIFEST_NAME} has format_version {version}; this alignpro-plugins reads up to "
                f"{FORMAT_VERSION}. Upgrade with: pip install -U alignpro-plugins"
            )
        if "base_model" not in data:
            raise ValueError(f"missing required key 'base_model' ({_BASE})")
        generation = data.get("generation", {})
        if not isinstance(generation, dict):
            raise ValueError(f"generation must be an object, got {type(generation).__name__}")
        check_generation_kwargs(generation)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["generation"] = GenerationDefaults(**generation)
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
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text ({exc.reason})") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path}: invalid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})"
            ) from exc
        try:
            return cls.from_dict(data)
        except ValueError as exc:  # name the file: a user may have several artifacts
            raise ValueError(f"{path}: {exc}") from exc


def portable_base_name(name: str) -> str:
    """The name a base model is recorded under: portable where one is known, never a path of this machine.

    A packaged model name stays as it is (lower case); a folder that is a packaged model's copy (its
    dequantised cache, or the encoder folder inside its package) becomes the packaged name; a snapshot in a
    Hugging Face cache (``.../models--org--name/snapshots/<revision>``) becomes the hub id ``org/name``; a hub
    id stays. Any other folder has no portable name and stays as its path (loading it elsewhere needs
    ``base_model=``). The weights hash recorded next to the name still decides whether a base fits.
    """
    if name.lower() in PACKAGED_MODELS:
        return name.lower()
    path = Path(name)
    if not path.is_absolute():
        return name
    parts = path.parts
    for model in PACKAGED_MODELS.values():
        if model.kind == "causal-lm" and path.name == model.name:
            # Ours only if the conversion marker says so; a recorded cache path that is gone is taken on trust
            # (the weights hash is checked once it resolves).
            if not path.exists() or (path / "ALIGNPRO_SOURCE").is_file():
                return model.name
        if model.kind == "encoder" and parts[-2:] == (model.module, model.relpath):
            return model.name
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--") :].replace("--", "/")
    return name


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


def model_weights_hash(name_or_path: str) -> str | None:
    """:func:`weights_hash` of a model folder, or of a hub id's snapshot in the local Hugging Face cache; None
    when there are no local weights to hash (a hub id not downloaded yet)."""
    if Path(name_or_path).is_dir():
        return weights_hash(name_or_path)
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(name_or_path, local_files_only=True)
    except Exception:  # not a valid hub id, or not in the cache: nothing local to hash
        return None
    return weights_hash(str(snapshot)) if isinstance(snapshot, str) else None
