"""Data loaders under bad input: one error type (DataError) naming the file and, where known, the row.

Each case here was a raw UnicodeDecodeError / BadGzipFile / EOFError / DatasetGenerationError, a silent empty
result, or a wrong row count before (issue 39, item 5). The hypothesis tests feed the loaders random bytes and
random JSON: they return rows or raise DataError, never anything else.
"""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignpro_plugins.data import (
    DataError,
    PreferencePair,
    load_preferences,
    load_prompt_pairs,
    load_prompts,
    read_records,
)

LOADERS = {
    "prompts": lambda path, **kw: load_prompts(str(path), **kw),
    "pairs": lambda path, **kw: load_prompt_pairs(str(path), **kw),
    "preferences": lambda path, **kw: load_preferences(str(path), **kw),
}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------------------------------------- file level
def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError) as err:
        load_prompts(str(path))
    assert str(err.value) == (
        f"{path}, line 2: not UTF-8 text (byte b'\\xe9' at column 16). Save the file as UTF-8"
    )
    whole = tmp_path / "latin1.json"
    whole.write_bytes(b'[\n {"prompt": "ok"},\n {"prompt": "na\xefve"}\n]')
    with pytest.raises(
        DataError, match=r"latin1.json, line 3: not UTF-8 text \(byte b'\\xef' at column 16\)"
    ):
        load_prompts(str(whole))


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "first"}\n{"prompt": "second"}\n')
    assert load_prompts(str(path)) == ["first", "second"]
    whole = tmp_path / "bom.json"
    whole.write_bytes(b'\xef\xbb\xbf[{"prompt": "only"}]')
    assert load_prompts(str(whole)) == ["only"]


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".json.gz"])
def test_a_file_that_is_not_gzip_is_named(tmp_path, suffix):
    path = tmp_path / f"plain{suffix}"
    path.write_text('{"prompt": "not compressed"}\n')
    with pytest.raises(DataError) as err:
        load_prompts(str(path))
    assert str(err.value).startswith(f"{path}: not a readable gzip file")
    assert "drop the .gz suffix" in str(err.value)


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".json.gz"])
def test_a_truncated_gzip_file_is_named(tmp_path, suffix):
    rows = [{"prompt": f"prompt number {i} " * 20} for i in range(200)]
    data = (
        "".join(json.dumps(r) + "\n" for r in rows) if suffix == ".jsonl.gz" else json.dumps(rows)
    ).encode()
    whole = gzip.compress(data)
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError) as err:
        load_prompts(str(path))
    assert str(err.value).startswith(f"{path}: the gzip file is cut off")
    if suffix == ".jsonl.gz":
        assert "after line " in str(err.value)  # how far the rows were good


def test_a_corrupt_gzip_stream_is_named(tmp_path):
    data = bytearray(gzip.compress(b'{"prompt": "x"}\n' * 500))
    data[len(data) // 2] ^= 0xFF
    path = tmp_path / "corrupt.jsonl.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"corrupt.jsonl.gz: (not a readable gzip file|.*line)"):
        load_prompts(str(path))


def test_a_csv_that_fails_to_build_names_the_file(tmp_path):
    path = tmp_path / "broken.csv"
    path.write_bytes(b"prompt,context\n\xff\xfe broken,\x00\n")
    with pytest.raises(DataError) as err:
        load_prompts(str(path))
    assert str(err.value).startswith(f"{path}: cannot read it as a csv: ")


def test_a_parquet_file_that_fails_to_build_names_the_file(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"broken.parquet: cannot read it as a parquet: "):
        load_prompts(str(path))


def test_a_hub_id_that_cannot_load_names_it(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"^no-such-org/no-such-data-set: cannot read it as a hub data set: "):
        load_prompts("no-such-org/no-such-data-set")


def test_a_folder_is_not_a_data_file(tmp_path):
    with pytest.raises(DataError, match="a folder, not a data file"):
        load_prompts(str(tmp_path))


@pytest.mark.parametrize(
    "name, content",
    [("empty.jsonl", ""), ("blank.jsonl", "\n\n  \n"), ("empty.json", ""), ("list.json", "[]")],
)
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_zero_rows_is_an_error_naming_the_file(tmp_path, name, content, loader):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        LOADERS[loader](path)
    assert str(err.value).startswith(str(path)) and "no rows" in str(err.value)


# ---------------------------------------------------------------------------------------------- limit
@pytest.mark.parametrize("limit", [0, -1, -5, 1.5, True, "3"])
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_limit_that_is_not_a_positive_int_is_refused(tmp_path, limit, loader):
    path = write_jsonl(
        tmp_path / "rows.jsonl",
        [
            {
                "prompt": f"p{i}",
                "instruction": f"p{i}",
                "optimized_prompt": "o",
                "chosen": "a",
                "rejected": "b",
            }
            for i in range(3)
        ],
    )
    with pytest.raises(
        ValueError, match=rf"limit must be None \(every row\) or an integer >= 1, got {limit!r}"
    ):
        LOADERS[loader](path, limit=limit)


def test_limit_keeps_the_first_rows_and_none_keeps_all(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": f"p{i}"} for i in range(3)])
    assert load_prompts(str(path), limit=2) == ["p0", "p1"]
    assert load_prompts(str(path), limit=3) == load_prompts(str(path), limit=10) == ["p0", "p1", "p2"]
    assert load_prompts(str(path)) == ["p0", "p1", "p2"]


# ---------------------------------------------------------------------------------------------- row numbers
def test_jsonl_rows_are_numbered_by_file_line_for_every_kind_of_error(tmp_path):
    # A blank line before the bad row: before, a field error said "row 1" and a JSON error "row 2" here.
    field_error = tmp_path / "field.jsonl"
    field_error.write_text('{"prompt": "a"}\n\n{"prompt": 3}\n')
    with pytest.raises(DataError, match=r"field.jsonl, line 3, field 'prompt': expected text, got int"):
        load_prompts(str(field_error))
    json_error = tmp_path / "json.jsonl"
    json_error.write_text('{"prompt": "a"}\n\n{"prompt": \n')
    with pytest.raises(DataError, match=r"json.jsonl, line 3: invalid JSON"):
        load_prompts(str(json_error))
    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"prompt": "a"}\n\n{"text": "b"}\n')
    with pytest.raises(DataError) as err:
        load_prompts(str(missing))
    assert (err.value.row, err.value.field) == (3, "prompt") and ", line 3," in str(err.value)


def test_json_list_rows_are_counted_from_one(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([{"prompt": "a"}, {"prompt": ""}]))
    with pytest.raises(DataError, match=r"rows.json, row 2, field 'prompt': empty text"):
        load_prompts(str(path))


# ---------------------------------------------------------------------------------------------- HH-RLHF
def hh(prompt: str, chosen: str, rejected: str, rejected_prompt: str | None = None) -> dict:
    return {
        "chosen": f"\n\nHuman: {prompt}\n\nAssistant: {chosen}",
        "rejected": f"\n\nHuman: {rejected_prompt or prompt}\n\nAssistant: {rejected}",
    }


def test_hh_rows_that_compare_nothing_are_skipped_with_a_counted_warning(tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "hh.jsonl",
        [
            hh("hi", "hello", "go away"),
            hh("tea?", "same answer", "same answer"),
            hh("tea?", "same answer", "same answer"),
            hh("cats?", "yes", "no", rejected_prompt="dogs?"),
            hh("sea?", "blue", "green"),
        ],
    )
    caplog.set_level(logging.WARNING)
    pairs = load_preferences(str(path))
    assert pairs == [
        PreferencePair("Human: hi", "hello", "go away"),
        PreferencePair("Human: sea?", "blue", "green"),
    ]
    assert (
        f"{path}: skipped 3 of 5 HH-RLHF rows that compare nothing: 2 with equal chosen and rejected answers, "
        "0 with an empty answer, 1 whose dialogues differ before the last turn"
    ) in caplog.text


def test_hh_file_where_every_row_is_skipped_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "ties.jsonl", [hh("q", "same", "same")])
    with pytest.raises(DataError, match=r"ties.jsonl: none of its 1 rows is usable"):
        load_preferences(str(path))


def test_read_records_still_reads_an_empty_wrapped_list(tmp_path):
    # The reader reports what is there; the loaders (which need rows) refuse zero rows.
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": [], "source": "x"}))
    assert read_records(path) == []
    with pytest.raises(DataError, match="no rows"):
        load_prompts(str(path))


# ---------------------------------------------------------------------------------------------- CLI
def test_the_cli_prints_a_data_error_as_one_line(tmp_path, capsys):
    from alignpro_plugins.cli import main

    path = tmp_path / "prompts.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    code = main(
        ["eval", "--prompts", str(path), "--target", "t", "--judge", "j", "--out", str(tmp_path / "o")]
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines  # one line, no traceback
    assert lines[0].startswith(f"alignpro eval: error: {path}: not a readable gzip file")


# ---------------------------------------------------------------------------------------------- fuzzing
SUFFIXES = [".jsonl", ".json", ".jsonl.gz", ".json.gz"]
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["prompt", "instruction", "optimized_prompt", "context", "chosen", "rejected", "data", "x"]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=12,
)


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def _load_all(path: Path) -> None:
    """Every loader on ``path``: rows of the right type, or DataError; nothing else may escape."""
    for name, load in LOADERS.items():
        try:
            out = load(path)
        except DataError as exc:
            assert str(exc).startswith(str(path)), exc
            continue
        assert out, name  # zero rows is always an error
        if name == "prompts":
            assert all(isinstance(p, str) and p.strip() for p in out)
        elif name == "pairs":
            assert all(isinstance(a, str) and isinstance(b, str) for a, b in out)
        else:
            assert all(isinstance(p, PreferencePair) for p in out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200), suffix=st.sampled_from(SUFFIXES), raw_gzip=st.booleans())
def test_random_bytes_give_rows_or_a_data_error(tmp_path, data, suffix, raw_gzip):
    path = tmp_path / f"fuzz{suffix}"
    if raw_gzip:  # the bytes as they are, even under a .gz name: not gzip, or a broken stream
        path.write_bytes(data)
    else:
        _write(path, data)
    _load_all(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=JSON, suffix=st.sampled_from(SUFFIXES))
def test_random_json_gives_rows_or_a_data_error(tmp_path, value, suffix):
    path = tmp_path / f"fuzz{suffix}"
    if ".jsonl" in suffix:
        rows = value if isinstance(value, list) else [value]
        _write(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    else:
        _write(path, json.dumps(value).encode())
    _load_all(path)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=120), suffix=st.sampled_from([".csv", ".parquet"]))
def test_random_csv_and_parquet_bytes_give_rows_or_a_data_error(tmp_path, data, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    _load_all(path)
