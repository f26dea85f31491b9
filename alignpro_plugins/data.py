"""Loading and validating training and evaluation data.

Every loader accepts a local file (.json, .jsonl, .jsonl.gz, .parquet, .csv) or a hub data set id (with
``split`` and optional ``data_dir``), and rejects bad rows with a :class:`DataError` naming the file, the
row and the field, rather than a stack trace from deep inside TRL.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCAL_SUFFIXES = (".json", ".jsonl", ".jsonl.gz", ".json.gz", ".parquet", ".csv")


class DataError(ValueError):
    """A data set row that cannot be used, with its location."""

    def __init__(self, source: str, row: int | None, field: str | None, problem: str, hint: str = "") -> None:
        where = (
            f"{source}"
            + (f", row {row}" if row is not None else "")
            + (f", field {field!r}" if field else "")
        )
        super().__init__(f"{where}: {problem}" + (f". {hint}" if hint else ""))
        self.source, self.row, self.field = source, row, field


def read_records(
    source: str | os.PathLike[str], *, split: str = "train", data_dir: str | None = None
) -> list[dict]:
    """Rows of a local file or a hub data set, as dicts."""
    src = str(source)
    path = Path(src)
    if path.exists():
        name = path.name.lower()
        if name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            rows = []
            with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
                for i, line in enumerate(fh):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DataError(src, i, None, f"invalid JSON ({exc.msg})") from None
            return rows
        if name.endswith((".json", ".json.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
                try:
                    data = json.load(fh)
                except json.JSONDecodeError as exc:
                    raise DataError(src, None, None, f"invalid JSON ({exc.msg}: line {exc.lineno})") from None
            if isinstance(data, dict):
                data = _object_rows(src, data)
            if not isinstance(data, list):
                raise DataError(src, None, None, "expected a list of objects")
            return data
        if name.endswith((".parquet", ".csv")):
            import datasets

            kind = "parquet" if name.endswith(".parquet") else "csv"
            return list(datasets.load_dataset(kind, data_files=src, split="train"))
        raise DataError(src, None, None, f"unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}")
    if src.startswith((".", "/", "~")) or src.endswith(LOCAL_SUFFIXES):
        raise DataError(src, None, None, "file not found")
    import datasets

    return list(datasets.load_dataset(src, data_dir=data_dir, split=split))


def _object_rows(src: str, data: dict[str, Any]) -> list[Any]:
    """The rows of a .json file holding one object: ``{"data": [{...}, ...]}`` (the first list of objects),
    columns of equal length (``{"prompt": [...], "context": [...]}``, as pandas ``to_json(orient="list")``
    writes), or a single row."""
    lists = {k: v for k, v in data.items() if isinstance(v, list)}
    if not lists:
        return [data]
    wrapped = next((v for v in lists.values() if v and isinstance(v[0], dict)), None)
    if wrapped is not None:
        return wrapped
    if len(lists) == len(data):
        lengths = {k: len(v) for k, v in lists.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(
                src, None, None, f"column-oriented JSON needs columns of equal length, got {lengths}"
            )
        return [dict(zip(lists, values, strict=True)) for values in zip(*lists.values(), strict=True)]
    if not any(lists.values()):
        return []  # an empty {"data": []} with other keys beside it
    raise DataError(
        src,
        None,
        None,
        'expected a list of objects, an object holding one (such as {"data": [...]}) or columns of '
        'equal length (such as {"prompt": [...], "context": [...]})',
        f"This object mixes lists and other values: {sorted(data)}",
    )


def _text(source: str, i: int, row: Any, field: str, *, allow_empty: bool = False) -> str:
    if not isinstance(row, dict):
        raise DataError(source, i, None, f"expected an object, got {type(row).__name__}")
    if field not in row:
        raise DataError(
            source, i, field, "missing field", f"Available fields: {sorted(row)}; set the field name option"
        )
    value = row[field]
    if value is None and allow_empty:
        return ""
    if not isinstance(value, str):
        raise DataError(source, i, field, f"expected text, got {type(value).__name__}")
    if not value.strip() and not allow_empty:
        raise DataError(source, i, field, "empty text")
    return value


def with_context(instruction: str, context: str) -> str:
    """Dolly/BPO style rows: the instruction followed by its context, when there is one."""
    return f"{instruction.strip()}\n\n{context.strip()}" if context and context.strip() else instruction


def load_prompts(
    source: str,
    *,
    field: str = "prompt",
    context_field: str | None = None,
    split: str = "train",
    data_dir: str | None = None,
    limit: int | None = None,
) -> list[str]:
    rows = read_records(source, split=split, data_dir=data_dir)
    prompts = []
    for i, row in enumerate(rows):
        text = _text(source, i, row, field)
        if context_field and isinstance(row, dict) and context_field in row:
            text = with_context(text, _text(source, i, row, context_field, allow_empty=True))
        prompts.append(text)
    return prompts[:limit] if limit else prompts


def load_prompt_pairs(
    source: str,
    *,
    prompt_field: str = "instruction",
    target_field: str = "optimized_prompt",
    context_field: str | None = "context",
    split: str = "train",
    limit: int | None = None,
) -> list[tuple[str, str]]:
    """(prompt, improved prompt) pairs for SFT, e.g. BPO's instruction / optimized_prompt."""
    rows = read_records(source, split=split)
    pairs = []
    for i, row in enumerate(rows):
        prompt = _text(source, i, row, prompt_field)
        if context_field and isinstance(row, dict) and context_field in row:
            prompt = with_context(prompt, _text(source, i, row, context_field, allow_empty=True))
        pairs.append((prompt, _text(source, i, row, target_field)))
    return pairs[:limit] if limit else pairs


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


def split_dialogue(text: str) -> tuple[str, str]:
    """HH-RLHF: split a whole dialogue into (conversation so far, last assistant turn)."""
    marker = "\n\nAssistant:"
    cut = text.rfind(marker)
    if cut < 0:
        raise ValueError("no '\\n\\nAssistant:' turn")
    return text[:cut].strip(), text[cut + len(marker) :].strip()


def load_preferences(
    source: str,
    *,
    prompt_field: str | None = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    split: str = "train",
    data_dir: str | None = None,
    limit: int | None = None,
) -> list[PreferencePair]:
    """Preference pairs: (prompt, chosen, rejected) rows, or HH-RLHF rows whose chosen/rejected hold the whole
    dialogue (detected when there is no prompt field: the last assistant turn is split off)."""
    rows = read_records(source, split=split, data_dir=data_dir)
    pairs = []
    for i, row in enumerate(rows):
        chosen = _text(source, i, row, chosen_field)
        rejected = _text(source, i, row, rejected_field)
        if prompt_field and isinstance(row, dict) and prompt_field in row:
            pairs.append(PreferencePair(_text(source, i, row, prompt_field), chosen, rejected))
            continue
        try:
            p_c, a_c = split_dialogue(chosen)
            p_r, a_r = split_dialogue(rejected)
        except ValueError as exc:
            raise DataError(
                source,
                i,
                chosen_field,
                f"no prompt field and not an HH-RLHF dialogue ({exc})",
                "Give prompt_field, or rows with full '\\n\\nHuman: ... \\n\\nAssistant: ...' dialogues",
            ) from None
        # A few real HH-RLHF rows diverge before the last turn; they compare dialogues, not answers: skip.
        if p_c == p_r and a_c and a_r and a_c != a_r:
            pairs.append(PreferencePair(p_c, a_c, a_r))
    return pairs[:limit] if limit else pairs


def split_by_prompt(
    items: Sequence[Any], key: Any, *, eval_fraction: float, seed: int
) -> tuple[list[Any], list[Any]]:
    """Hold out whole prompts (not rows): a prompt's rows all land on one side."""
    prompts = sorted({key(x) for x in items})
    rng = random.Random(seed)
    rng.shuffle(prompts)
    n_eval = int(round(len(prompts) * eval_fraction))
    held = set(prompts[:n_eval])
    return [x for x in items if key(x) not in held], [x for x in items if key(x) in held]


def dedupe(texts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(texts))
