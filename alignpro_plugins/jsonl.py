"""Append-only jsonl files that survive an interrupted run (answer caches, evaluation records)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
_MAX_MALFORMED_WARNINGS = 5


def read_jsonl_rows(path: Path, required: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The rows of a jsonl file this package appends to, skipping (with a warning naming ``path:line``) any
    line that does not parse or lacks a ``required`` key: a run killed mid-write leaves a cut-off last line,
    and resuming must not fail on it."""
    rows: list[dict[str, Any]] = []
    bad: list[tuple[int, str]] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)  # bytes: a multi-byte character cut in half fails this line only
            except ValueError as exc:
                bad.append((lineno, f"invalid JSON: {exc}"))
                continue
            missing = [k for k in required if k not in row] if isinstance(row, dict) else None
            if missing is None or missing:
                what = f"missing {missing}" if missing else f"expected an object, got {type(row).__name__}"
                bad.append((lineno, what))
                continue
            rows.append(row)
    for lineno, why in bad[:_MAX_MALFORMED_WARNINGS]:
        logger.warning(
            "%s:%d: skipping a malformed line (%s); an interrupted run can leave one", path, lineno, why
        )
    if len(bad) > _MAX_MALFORMED_WARNINGS:
        logger.warning("%s: skipped %d more malformed lines", path, len(bad) - _MAX_MALFORMED_WARNINGS)
    return rows


def append_jsonl(path: Path, lines: Sequence[str]) -> None:
    """Append JSON lines, first ending a last line that an interrupted run left without its newline (else the
    first new row would be glued to it and lost too)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        end = fh.seek(0, os.SEEK_END)
        if end:
            fh.seek(end - 1)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
        fh.write("".join(line + "\n" for line in lines).encode("utf-8"))
