"""The benchmark scripts' tables, sections and pooling, from evaluation summaries and records (no models needed)."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from alignpro_plugins import stats
from alignpro_plugins.eval_report import ANSWER_WORDS, format_win, scores_by_config, win_cells
from benchmarks.gated_retry import against_frozen_cells, mean_words
from benchmarks.run_benchmark import RESULTS_PAGE, targets_table

RNG = random.Random(0)
FROZEN = [RNG.gauss(0, 1) for _ in range(80)]
SHIFTED = [x + 0.5 + RNG.gauss(0, 1) for x in FROZEN]  # wins, with more spread than frozen


def _summary(gated: list[float] | None) -> dict:
    def entry(vals: list[float]) -> dict:
        d = stats.summary(vals)
        d["vs_reference"] = stats.win_rate(vals, FROZEN)
        d["variance_ratio_vs_reference"] = stats.variance_ratio(vals, FROZEN)
        return d

    configs = {
        "frozen": {j: stats.summary(FROZEN) for j in ("independent", "reward")},
        "align-pro": {j: entry(SHIFTED) for j in ("independent", "reward")},
    }
    if gated is not None:
        configs["align-pro-gated"] = {j: entry(gated) for j in ("independent", "reward")}
        configs["align-pro-gated"]["target_calls_per_prompt"] = 1.5
    return {"configs": configs, "head_to_head": {}}


def _row(table: str, start: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(start))


def test_gated_rows_judge_the_gated_configuration_not_align_pro():
    # Lift only the lowest half and squeeze it toward the median: wins on those prompts, lower variance.
    median = sorted(FROZEN)[len(FROZEN) // 2]
    gated = [x if x >= median else median - 0.2 * (median - x) for x in FROZEN]
    table = targets_table(_summary(gated))
    gated_variance = _row(table, "| (deployment mode) reward variance below frozen (independent)")
    assert gated_variance.endswith("| met |")
    assert _row(table, "| reward variance below frozen (independent)").endswith("| NOT met |")
    gated_win = _row(table, "| (deployment mode, 1.50 target calls per prompt) align-pro-gated vs frozen")
    assert "75.0%" in gated_win  # half the prompts tie (0.5 each) and the lifted half wins: 0.5 + 0.25
    assert gated_win.endswith("| met |")


def test_no_gated_rows_without_the_gated_configuration():
    assert "align-pro-gated" not in targets_table(_summary(None))


def _records(config: str, rewards: list[float], words: int) -> list[dict]:
    return [
        {
            "config": config,
            "idx": i,
            "answer": " ".join(["w"] * words),
            "rewards": {"independent": r, "reward": -r},
        }
        for i, r in enumerate(rewards)
    ]


def test_held_out_cells_pair_each_configuration_with_frozen():
    records = _records("frozen", FROZEN, 10) + _records("searched", SHIFTED, 30)
    RNG.shuffle(records)  # records are written as cells finish: the prompt index decides the pairing
    by = scores_by_config(records)
    assert by["frozen", "independent"] == FROZEN and by["searched", "reward"] == [-x for x in SHIFTED]
    assert by["searched", ANSWER_WORDS] == [30] * 80
    win = stats.win_rate(SHIFTED, FROZEN)
    # Every answer is 20 words longer: the length effect cannot be told apart, the equal-length win is the win.
    assert win_cells(by, "searched", "frozen", "independent") == f"{format_win(win)} | {format_win(win)}"
    cells = against_frozen_cells(by, "searched", "independent").split(" | ")
    assert cells[0] == format_win(win) and cells[1] == format_win(win)
    assert float(cells[2]) == pytest.approx(sum(SHIFTED) / 80 - sum(FROZEN) / 80, abs=1e-3)
    # The training reward here is the negated judge: the same configuration loses under it.
    assert against_frozen_cells(by, "searched", "reward").startswith(
        win_cells(by, "searched", "frozen", "reward")
    )
    assert stats.win_rate(by["searched", "reward"], by["frozen", "reward"])["win_rate"] < 0.5
    assert (mean_words(records, "searched"), mean_words(records, "frozen")) == (30, 10)


def test_win_cells_give_the_win_at_equal_length_beside_the_win():
    # A judge that only counts words: the longer configuration wins, at equal length it does not.
    words_a = [RNG.randint(60, 130) for _ in range(120)]
    words_b = [RNG.randint(20, 100) for _ in range(120)]
    records = [
        {"config": c, "idx": i, "answer": " ".join(["w"] * n), "rewards": {"len": float(n)}}
        for c, lengths in (("long", words_a), ("short", words_b))
        for i, n in enumerate(lengths)
    ]
    raw, equal = win_cells(scores_by_config(records), "long", "short", "len").split(" | ")
    assert float(raw.split("%")[0]) > 70 and 40 < float(equal.split("%")[0]) < 60


PAGE = """# Benchmarks

intro

## Prompter rewrite throughput

old numbers

<!-- padding-benchmark:start -->
## Length-planned generate calls (padding)

padding numbers
<!-- padding-benchmark:end -->

<!-- align-pro-comparison:start -->
## Align-Pro comparison (standard budget)

old table
<!-- align-pro-comparison:end -->

## Wider notes

kept
"""


def test_marked_section_is_replaced_in_place_and_new_ones_are_appended(tmp_path):
    from benchmarks.run_benchmark import write_section

    page = tmp_path / "benchmarks.md"
    page.write_text(PAGE)
    write_section(page, "align-pro-comparison", "## Align-Pro comparison (standard budget)\n\nnew table")
    write_section(page, "gated-retry-confirmation-seeded", "## Confirmation\n\nrows")
    text = page.read_text()
    assert "old table" not in text and "new table" in text
    # Replaced where it was (the hand-written section after it stays after it); the new key goes last.
    assert text.index("new table") < text.index("## Wider notes") < text.index("## Confirmation")
    assert text.endswith("<!-- gated-retry-confirmation-seeded:end -->\n")


def test_publish_writes_the_page_it_is_given_and_nothing_with_no_docs(tmp_path, capsys):
    from benchmarks.run_benchmark import publish

    page, copy = tmp_path / "history.md", tmp_path / "run" / "section.md"
    page.write_text(PAGE)
    publish("## Quick\n\nrows", copy, "align-pro-comparison-quick", page, docs=False)
    assert "## Quick" in capsys.readouterr().out
    assert not copy.exists() and page.read_text() == PAGE
    publish("## Quick\n\nrows", copy, "align-pro-comparison-quick", page)
    assert copy.read_text() == "## Quick\n\nrows"
    assert page.read_text().endswith(
        "<!-- align-pro-comparison-quick:start -->\n## Quick\n\nrows\n<!-- align-pro-comparison-quick:end -->\n"
    )


def test_pooled_rewards_keep_pairs_and_refuse_a_partial_benchmark(tmp_path):
    from benchmarks.gated_retry import pooled_with_folder

    bench = ["p0", "p1", "p2"]
    path = tmp_path / "records.jsonl"
    fingerprints = {"frozen": "f-frozen", "align-pro": "f-prompter"}

    def record(config, i, value, fingerprint=None):
        return {
            "config": config,
            "idx": i,
            "prompt": bench[i],
            "answer": "w " * int(abs(value)),
            "rewards": {"independent": value},
            "fingerprint": fingerprint or fingerprints[config],
        }

    rows = [record("frozen", i, float(i)) for i in (2, 0, 1)]  # written out of order
    rows += [{**record("frozen", 0, 0.0), "idx": 7}]  # from a longer prompt list: the prompt text decides
    rows += [record("align-pro", i, 10.0 + i) for i in range(3)]
    rows += [record("align-pro", 1, 99.0)]  # a resumed run wrote prompt 1 again: the later record counts
    rows += [record("align-pro", 2, -5.0, fingerprint="another prompter")]  # not this setup: ignored
    rows += [{**record("frozen", 0, 5.0), "prompt": "not a benchmark prompt"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    new = {
        ("frozen", "independent"): [7.0],
        ("align-pro", "independent"): [8.0],
        ("align-pro", ANSWER_WORDS): [3],
    }

    pooled = pooled_with_folder(path, bench, new, fingerprints)
    assert pooled == {
        ("frozen", "independent"): [0.0, 1.0, 2.0, 7.0],
        ("align-pro", "independent"): [10.0, 99.0, 12.0, 8.0],
        ("align-pro", ANSWER_WORDS): [10, 99, 12, 3],  # the answers' lengths pool in the same order
    }
    # A configuration the benchmark did not evaluate on every prompt cannot be paired: no pool at all.
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    assert pooled_with_folder(path, bench, new, fingerprints) is None
    # Nor can another prompter's records stand in for this one's.
    only_other = [r for r in rows if r["config"] == "frozen"] + [
        record("align-pro", i, 1.0, fingerprint="another prompter") for i in range(3)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in only_other))
    assert pooled_with_folder(path, bench, new, fingerprints) is None


def test_recorded_commands_can_be_pasted_back_into_a_shell(monkeypatch):
    import shlex

    from benchmarks.gated_retry import slug
    from benchmarks.run_benchmark import command_line

    args = ["--label", "seeded standard run", "--out", "runs/bench"]
    monkeypatch.setattr("sys.argv", ["/abs/path/benchmarks/gated_retry.py", *args])  # as `python -m` sets it
    line = command_line()
    assert line == "python -m benchmarks.gated_retry --label 'seeded standard run' --out runs/bench"
    assert shlex.split(line)[1:] == ["-m", "benchmarks.gated_retry", *args]
    assert command_line(["--quick"]) == "python -m benchmarks.gated_retry --quick"
    from benchmarks.run_benchmark import ROOT

    # a path inside the checkout is written relative to its root; any other path is kept as given
    inside = command_line(["--out", str(ROOT / "runs" / "bench"), "--data", "/elsewhere/data"])
    assert inside == "python -m benchmarks.gated_retry --out runs/bench --data /elsewhere/data"
    assert slug("Seeded standard run (2026-12-05)") == "seeded-standard-run-2026-12-05"


def test_a_pooled_folder_gives_its_prompts_in_written_order_for_this_setup_only(tmp_path):
    from benchmarks.gated_retry import pooled_text, recorded_prompts

    path = tmp_path / "records.jsonl"
    rows = [
        {"config": "frozen", "prompt": "b", "fingerprint": "f"},
        {"config": "align-pro", "prompt": "z", "fingerprint": "f"},  # not the frozen configuration
        {"config": "frozen", "prompt": "a", "fingerprint": "f"},
        {"config": "frozen", "prompt": "b", "fingerprint": "f"},  # resumed: written twice, listed once
        {"config": "frozen", "prompt": "c", "fingerprint": "another target"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert recorded_prompts(path, "f") == ["b", "a"]
    assert recorded_prompts(tmp_path / "missing.jsonl", "f") == []
    assert pooled_text([("eval", ["p"] * 100)]) == "the benchmark's 100 (eval)"
    assert (
        pooled_text([("eval", ["p"] * 100), ("c1", ["q"] * 200)]) == "the benchmark's 100 (eval), 200 from c1"
    )


def test_pooling_folders_keeps_pairs_counts_a_prompt_once_and_names_what_it_leaves_out(tmp_path):
    from benchmarks.gated_retry import pool

    fingerprints = {"frozen": "F", "align-pro": "A"}

    def write(folder, rows):
        (tmp_path / folder).mkdir()
        lines = [
            {
                "config": c,
                "prompt": x,
                "rewards": {"independent": v},
                "fingerprint": fingerprints[c] if fp else "old",
            }
            for c, x, v, fp in rows
        ]
        (tmp_path / folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))

    def both(x, f, a, fp=True):
        return [("frozen", x, f, fp), ("align-pro", x, a, fp)]

    write("eval", both("e1", 0.0, 1.0) + both("e2", 0.0, 2.0))
    # A confirmation folder holds copies of the benchmark's records and its own slice, written out of order.
    write("c1", both("e1", 9.0, 9.0) + both("c1-b", 0.0, 4.0) + both("c1-a", 0.0, 3.0))
    write("stale", both("s1", 0.0, 5.0, fp=False))  # another setup's records only
    write("partial", both("p1", 0.0, 6.0)[:1])  # frozen without align-pro: cannot be paired
    new = {("frozen", "independent"): [0.5], ("align-pro", "independent"): [7.0]}

    pooled, used, left_out = pool(
        tmp_path, ["eval", "c1", "stale", "partial"], ["e1", "e2"], new, fingerprints
    )
    assert used == [("eval", ["e1", "e2"]), ("c1", ["c1-b", "c1-a"])]  # e1 counted once, with the benchmark
    assert pooled[("frozen", "independent")] == [0.0, 0.0, 0.0, 0.0, 0.5]
    assert pooled[("align-pro", "independent")] == [1.0, 2.0, 4.0, 3.0, 7.0]  # the same prompt order
    assert [f for f, _ in left_out] == ["stale", "partial"]
    assert "no records of this setup" in left_out[0][1] and "every configuration" in left_out[1][1]
    # A folder left out does not take its prompts from the folders after it.
    _, used, left_out = pool(tmp_path, ["partial", "c1"], ["e1", "e2"], new, fingerprints)
    assert used == [("c1", ["e1", "c1-b", "c1-a"])] and [f for f, _ in left_out] == ["partial"]
    # Without folders (the benchmark's own run) the pool is the new prompts alone.
    assert pool(tmp_path, [], ["e1"], new, fingerprints) == (new, [], [])


def test_a_slice_past_the_end_of_a_set_names_where_each_set_ends():
    from benchmarks.gated_retry import slice_text

    # The real evaluation sets (../shared/data, as in CI): dolly_eval holds 200 prompts, self_instruct_eval 252.
    assert slice_text(50, 100) == "51–150 of dolly_eval and of self_instruct_eval"
    assert slice_text(150, 102) == "151–200 of dolly_eval and 151–252 of self_instruct_eval"


def test_a_confirmation_refuses_a_pool_it_cannot_make_before_any_work(tmp_path):
    from benchmarks.gated_retry import check_slice

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "records.jsonl").write_text(json.dumps({"prompt": "seen"}) + "\n")
    (tmp_path / "c1").mkdir()
    (tmp_path / "c1" / "records.jsonl").write_text(json.dumps({"prompt": "old"}) + "\n")

    def refused(*args) -> str:
        with pytest.raises(SystemExit) as err:
            check_slice(tmp_path, *args)
        return str(err.value)

    assert "give --offset N too" in refused("eval-gated-retry", False, ["p"], ["c1"], "1–50")
    assert "raise --offset" in refused("c2", True, ["seen", "p"], [], "1–50")
    assert "give --eval-dir another folder" in refused("c1", True, ["p"], ["c1"], "51–150")
    assert "does not exist" in refused("c2", True, ["p"], ["c3"], "51–150")
    assert "leave it out of --pool-with" in refused("c2", True, ["old"], ["c1"], "51–150")
    check_slice(tmp_path, "c2", True, ["p"], ["c1"], "51–150")  # a new slice, an earlier folder: fine


ROOT = Path(__file__).resolve().parents[1]
# The sections each kept script writes into docs/benchmarks.md (run_benchmark's quick runs and gated_retry's
# confirmations go to docs/benchmarks-history.md instead).
RESULTS_PAGE_KEYS = (
    "align-pro-comparison",
    "rewrite-benchmark",
    "padding-benchmark",
    "backends-benchmark",
    "reward-scoring-benchmark",
)


def test_the_results_page_holds_each_scripts_section_once_and_stays_short():
    text = RESULTS_PAGE.read_text()
    for key in RESULTS_PAGE_KEYS:
        assert text.count(f"<!-- {key}:start -->") == 1 and text.count(f"<!-- {key}:end -->") == 1, key
        assert text.index(f"<!-- {key}:start -->") < text.index(f"<!-- {key}:end -->"), key
    assert len(text.splitlines()) < 400, (
        "docs/benchmarks.md is the five-minute page: details go to the history"
    )


def test_documented_benchmark_commands_name_kept_scripts():
    pages = [RESULTS_PAGE, ROOT / "benchmarks" / "README.md", ROOT / "README.md"]
    named = {m for page in pages for m in re.findall(r"python -m benchmarks\.(\w+)", page.read_text())}
    assert named >= {"run_benchmark", "gated_retry"}
    assert named <= {p.stem for p in (ROOT / "benchmarks").glob("*.py")}


def test_every_benchmark_script_is_in_the_benchmarks_readme_and_there_are_few():
    # A finished experiment leaves main; what stays is a script a user runs, listed where users look for it.
    readme = (ROOT / "benchmarks" / "README.md").read_text()
    scripts = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name != "__init__.py")
    assert [s for s in scripts if f"`{s}`" not in readme] == []
    assert len(scripts) <= 12


def test_targets_table_gives_each_win_rate_its_win_at_equal_length():
    summary = _summary(None)
    for judge in ("independent", "reward"):
        summary["configs"]["align-pro"][judge]["vs_reference_length_controlled"] = {
            "win_rate": 0.51,
            "ci_low": 0.45,
            "ci_high": 0.57,
        }
    row = _row(targets_table(summary), "| align-pro vs frozen win rate ≥ 75% and CI low > 50% (independent)")
    win = stats.win_rate(SHIFTED, FROZEN)
    assert f"| {win['win_rate']:.1%}; at equal length 51.0% [45–57] |" in row


def test_the_standard_benchmark_meets_each_mode_with_best_of_n_at_as_many_calls():
    from alignpro_plugins.evaluation import BestOfN, FixedTemplate, FrozenAlone, WithRetryGate
    from benchmarks.run_benchmark import BEST_OF_N_TEMPERATURE, BUDGETS, reranks, sampling_baselines

    sampling = sampling_baselines([2, 3, BUDGETS["standard"]["best_of_k"]])
    assert [c.name for c in sampling] == ["best-of-2", "best-of-3", "best-of-4"]
    assert all(isinstance(c, BestOfN) and c.temperature == BEST_OF_N_TEMPERATURE for c in sampling)
    prompter_stand_in = FixedTemplate(template="stand-in", name="align-pro")
    modes = reranks([FrozenAlone(), FixedTemplate()], prompter_stand_in)
    assert [(c.name, len(c.retry)) for c in modes] == [("rerank-template", 1), ("rerank", 1), ("rerank-3", 2)]
    assert all(isinstance(c, WithRetryGate) and c.threshold == float("inf") for c in modes)


def _cache(path: Path, rows: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"key": k, "answer": a}) + "\n" for k, a in rows.items()))


def _read_cache(path: Path) -> dict[str, str]:
    return {(r := json.loads(ln))["key"]: r["answer"] for ln in path.read_text().splitlines() if ln.strip()}


def test_answers_from_an_earlier_run_seed_every_stage_cache_once(tmp_path: Path) -> None:
    from benchmarks.run_benchmark import ANSWER_CACHE_STAGES, answer_cache_stages, seed_answer_caches

    old, new = tmp_path / "old", tmp_path / "new"
    _cache(old / "guidance" / "target_cache.jsonl", {"a": "A", "b": "B"})
    _cache(old / "eval" / "target_cache.jsonl", {"b": "B", "c": "C"})
    _cache(new / "sft" / "target_cache.jsonl", {"z": "Z"})  # a stage that already started keeps its cache
    assert seed_answer_caches(new, old) == 3
    for stage in ANSWER_CACHE_STAGES:
        want = {"z": "Z"} if stage == "sft" else {"a": "A", "b": "B", "c": "C"}
        assert _read_cache(new / stage / "target_cache.jsonl") == want
    with pytest.raises(SystemExit, match="no <stage>/target_cache.jsonl"):
        seed_answer_caches(new, tmp_path / "missing")
    no_grpo = tmp_path / "no-grpo"  # a run without GRPO seeds no rl/ folder
    assert seed_answer_caches(no_grpo, old, answer_cache_stages(with_grpo=False)) == 3
    assert sorted(p.name for p in no_grpo.iterdir()) == sorted(set(ANSWER_CACHE_STAGES) - {"rl"})
    assert "rl" in answer_cache_stages(with_grpo=True)


def test_merging_the_search_answers_into_the_sft_cache_adds_only_new_keys(tmp_path: Path) -> None:
    from benchmarks.run_benchmark import merge_answer_cache

    src, dest = tmp_path / "guidance.jsonl", tmp_path / "sft" / "target_cache.jsonl"
    _cache(src, {"a": "A", "b": "B"})
    merge_answer_cache(src, dest)  # no destination yet: a copy
    assert _read_cache(dest) == {"a": "A", "b": "B"}
    _cache(src, {"b": "B", "c": "C"})
    merge_answer_cache(src, dest)
    assert dest.read_text().count('"key"') == 3 and _read_cache(dest) == {"a": "A", "b": "B", "c": "C"}
    merge_answer_cache(tmp_path / "absent.jsonl", dest)
    assert dest.read_text().count('"key"') == 3
