"""Loading and validating training and evaluation data.

Every loader accepts a local file (.json, .jsonl, .jsonl.gz, .json.gz, .parquet, .csv) or a hub data set id
(with ``split`` and optional ``data_dir``). Whatever is wrong with the data (bytes that are not UTF-8, a file
that is not gzip or is cut off, JSON that does not parse, a data set that fails to build, a bad row, no rows at
all) raises one error type, :class:`DataError`, naming the file and, where known, the row and the field, rather
than a stack trace from deep inside the standard library, ``datasets`` or TRL.

Rows are counted from 1 and the same way in every message: a JSONL row by its line in the file (blank lines
count), a ``.json`` row by its position in the list, a CSV or Parquet row by its position after the header.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".json", ".jsonl", ".jsonl.gz", ".json.gz", ".parquet", ".csv")
# What a gzip stream that is not gzip, corrupt or cut off raises while it is read.
_GZIP_ERRORS = (OSError, EOFError, zlib.error)


class DataError(ValueError):
    """Data that cannot be used, with its location: ``source``, ``row`` (counted from 1, a JSONL file's line
    number; None when the problem is the whole file) and ``field``."""

    def __init__(
        self,
        source: str,
        row: int | None,
        field: str | None,
        problem: str,
        hint: str = "",
        *,
        unit: str = "row",
    ) -> None:
        where = (
            f"{source}"
            + (f", {unit} {row}" if row is not None else "")
            + (f", field {field!r}" if field else "")
        )
        super().__init__(f"{where}: {problem}" + (f". {hint}" if hint else ""))
        self.source, self.row, self.field = source, row, field


@dataclass(frozen=True)
class Located:
    """One row and where it is: ``unit`` ("line" in a JSONL file, else "row") and ``number`` (from 1)."""

    row: Any
    number: int
    unit: str = "row"

    def error(self, source: str, field: str | None, problem: str, hint: str = "") -> DataError:
        return DataError(source, self.number, field, problem, hint, unit=self.unit)


def check_limit(limit: int | None) -> None:
    """``limit`` is None (every row) or a positive int; 0 and negative numbers are refused, not guessed at."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None (every row) or an integer >= 1, got {limit!r}")


def read_records(
    source: str | os.PathLike[str], *, split: str = "train", data_dir: str | None = None
) -> list[Any]:
    """Rows of a local file or a hub data set (usually dicts; a row of another type is returned as it is)."""
    return [r.row for r in read_located(source, split=split, data_dir=data_dir)]


def read_located(
    source: str | os.PathLike[str], *, split: str = "train", data_dir: str | None = None
) -> list[Located]:
    """:func:`read_records` with each row's place in the file, for error messages."""
    src = str(source)
    path = Path(src)
    if path.is_dir():
        raise DataError(
            src, None, None, f"a folder, not a data file; give one of {', '.join(LOCAL_SUFFIXES)}"
        )
    if path.exists():
        name = path.name.lower()
        if name.endswith((".jsonl", ".jsonl.gz")):
            return list(_jsonl_rows(src, path))
        if name.endswith((".json", ".json.gz")):
            return [Located(row, i) for i, row in enumerate(_json_rows(src, path), start=1)]
        if name.endswith((".parquet", ".csv")):
            kind = "parquet" if name.endswith(".parquet") else "csv"
            rows = _build_dataset(src, kind, lambda ds: ds.load_dataset(kind, data_files=src, split="train"))
            return [Located(row, i) for i, row in enumerate(rows, start=1)]
        raise DataError(src, None, None, f"unsupported file type; use one of {', '.join(LOCAL_SUFFIXES)}")
    if src.startswith((".", "/", "~")) or src.endswith(LOCAL_SUFFIXES):
        raise DataError(src, None, None, "file not found")
    rows = _build_dataset(
        src, "hub data set", lambda ds: ds.load_dataset(src, data_dir=data_dir, split=split)
    )
    return [Located(row, i) for i, row in enumerate(rows, start=1)]


def _read_bytes(src: str, path: Path) -> bytes:
    if not path.name.lower().endswith(".gz"):
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read()
    except _GZIP_ERRORS as exc:
        raise _gzip_error(src, exc) from None


def _gzip_error(src: str, exc: BaseException, lines_read: int = 0) -> DataError:
    if isinstance(exc, EOFError):
        read = f" after line {lines_read}" if lines_read else ""
        return DataError(
            src, None, None, f"the gzip file is cut off{read} (it ends before its end-of-stream marker)"
        )
    return DataError(
        src,
        None,
        None,
        f"not a readable gzip file ({exc})",
        "The name ends in .gz: compress it with gzip, or drop the .gz suffix if it is plain text",
    )


def _decode(src: str, data: bytes, line: int | None = None) -> str:
    """``data`` as text; ``line`` is its line number when it is one line of a file, None for a whole file."""
    try:
        return data.decode("utf-8-sig" if line in (None, 1) else "utf-8")  # a leading BOM is tolerated
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        if line is None:
            line = data.count(b"\n", 0, exc.start) + 1
        bad = data[exc.start : exc.start + 1]
        raise DataError(
            src,
            line,
            None,
            f"not UTF-8 text (byte {bad!r} at column {exc.start - line_start + 1})",
            "Save the file as UTF-8",
            unit="line",
        ) from None


def _jsonl_rows(src: str, path: Path) -> Iterator[Located]:
    opener: Any = gzip.open if path.name.lower().endswith(".gz") else open
    number = 0  # lines read, for a gzip stream that ends early
    try:
        with opener(path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                text = _decode(src, raw, number)
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DataError(src, number, None, f"invalid JSON ({exc.msg})", unit="line") from None
                except RecursionError:
                    raise DataError(src, number, None, "JSON nested too deeply", unit="line") from None
                yield Located(row, number, "line")
    except _GZIP_ERRORS as exc:
        raise _gzip_error(src, exc, number) from None


def _json_rows(src: str, path: Path) -> list[Any]:
    text = _decode(src, _read_bytes(src, path))
    if not text.strip():
        raise DataError(src, None, None, "empty file: no rows")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            src, None, None, f"invalid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})"
        ) from None
    except RecursionError:
        raise DataError(src, None, None, "JSON nested too deeply") from None
    if isinstance(data, dict):
        data = _object_rows(src, data)
    if not isinstance(data, list):
        raise DataError(src, None, None, f"expected a list of objects, got {type(data).__name__}")
    return data


def _build_dataset(src: str, kind: str, load: Any) -> list[Any]:
    """The rows ``datasets`` builds; any failure to build them (a broken CSV or Parquet file, bytes that are
    not UTF-8, a hub id that cannot be loaded) becomes a DataError naming the source."""
    from alignpro_plugins.extras import require

    datasets = require("datasets", "Loading a data set by hub id, CSV or Parquet")

    try:
        return list(load(datasets))
    except Exception as exc:
        # datasets wraps the real cause ("An error occurred while generating the dataset"): report that.
        cause: BaseException = exc
        for _ in range(10):  # a chain is short; the bound only guards against a cycle
            inner = cause.__cause__ or cause.__context__
            if inner is None:
                break
            cause = inner
        detail = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise DataError(
            src,
            None,
            None,
            f"cannot read it as a {kind}: {type(cause).__name__}" + (f": {detail}" if detail else ""),
        ) from None


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


def _text(source: str, at: Located, field: str, *, allow_empty: bool = False) -> str:
    row = at.row
    if not isinstance(row, dict):
        raise at.error(source, None, f"expected an object, got {type(row).__name__}")
    if field not in row:
        raise at.error(
            source, field, "missing field", f"Available fields: {sorted(row)}; set the field name option"
        )
    value = row[field]
    if value is None and allow_empty:
        return ""
    if not isinstance(value, str):
        raise at.error(source, field, f"expected text, got {type(value).__name__}")
    if not value.strip() and not allow_empty:
        raise at.error(source, field, "empty text")
    return value


def _rows(source: str, split: str, data_dir: str | None, limit: int | None) -> list[Located]:
    check_limit(limit)
    rows = read_located(source, split=split, data_dir=data_dir)
    if not rows:
        raise DataError(source, None, None, "no rows (an empty file or list)")
    return rows


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
    """The prompts of a file or hub data set, at most ``limit`` (None: all; 0 or less is refused)."""
    prompts = []
    for at in _rows(source, split, data_dir, limit):
        text = _text(source, at, field)
        if context_field and isinstance(at.row, dict) and context_field in at.row:
            text = with_context(text, _text(source, at, context_field, allow_empty=True))
        prompts.append(text)
    return prompts[:limit]


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
    pairs = []
    for at in _rows(source, split, None, limit):
        prompt = _text(source, at, prompt_field)
        if context_field and isinstance(at.row, dict) and context_field in at.row:
            prompt = with_context(prompt, _text(source, at, context_field, allow_empty=True))
        pairs.append((prompt, _text(source, at, target_field)))
    return pairs[:limit]


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
    dialogue (detected when there is no prompt field: the last assistant turn is split off).

    HH-RLHF rows that compare nothing are skipped, with one warning giving the counts: equal answers, an empty
    answer, or dialogues that differ before the last turn (they compare dialogues, not answers)."""
    rows = _rows(source, split, data_dir, limit)
    pairs = []
    skipped = {"equal": 0, "empty": 0, "diverge": 0}
    for at in rows:
        chosen = _text(source, at, chosen_field)
        rejected = _text(source, at, rejected_field)
        if prompt_field and isinstance(at.row, dict) and prompt_field in at.row:
            pairs.append(PreferencePair(_text(source, at, prompt_field), chosen, rejected))
            continue
        try:
            p_c, a_c = split_dialogue(chosen)
            p_r, a_r = split_dialogue(rejected)
        except ValueError as exc:
            raise at.error(
                source,
                chosen_field,
                f"no prompt field and not an HH-RLHF dialogue ({exc})",
                "Give prompt_field, or rows with full '\\n\\nHuman: ... \\n\\nAssistant: ...' dialogues",
            ) from None
        if p_c != p_r:
            skipped["diverge"] += 1
        elif not (a_c and a_r):
            skipped["empty"] += 1
        elif a_c == a_r:
            skipped["equal"] += 1
        else:
            pairs.append(PreferencePair(p_c, a_c, a_r))
    if any(skipped.values()):
        logger.warning(
            "%s: skipped %d of %d HH-RLHF rows that compare nothing: %d with equal chosen and rejected "
            "answers, %d with an empty answer, %d whose dialogues differ before the last turn",
            source,
            sum(skipped.values()),
            len(rows),
            skipped["equal"],
            skipped["empty"],
            skipped["diverge"],
        )
    if not pairs:
        raise DataError(source, None, None, f"none of its {len(rows)} rows is usable (see the warning)")
    return pairs[:limit]


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
