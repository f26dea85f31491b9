"""The numbers the docs quote come from one generated summary (benchmarks/docs_numbers.py).

* Every renderer reads the summary the Evaluator really writes (a tiny evaluation builds one here), and its
  words ("wins", "ties", "loses") follow the intervals.
* ``python -m benchmarks.docs_numbers`` rewrites the marked blocks of a checkout; ``--check`` fails on a page whose
  blocks are out of date, and names it.
* The committed pages: in sync with the committed docs/benchmark-summary.json (once the standard run has written
  it), and no win-rate-looking number outside a marked block, save the few the allow-list below names and
  justifies.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from alignpro_plugins.targets import CallableTarget
from benchmarks import docs_numbers
from benchmarks.docs_numbers import BLOCK, PENDING, main, pages, render, sync

ROOT = Path(__file__).resolve().parents[1]
PERCENT = re.compile(r"\d+(?:\.\d+)?\s?%")
# Pages that record history rather than quote the current result: the benchmark pages (written by the benchmark
# scripts themselves), the changelog, and the stage pages' design notes, which cite the experiment behind each
# default (docs/benchmarks-history.md).
RECORD_PAGES = ("docs/benchmarks.md", "docs/benchmarks-history.md", "docs/changelog.md", "docs/trainers/")
# Percentages that are not results, anywhere.
ALLOWED = {
    "95%": "the confidence level of every interval",
    "50%": "the chance line of a paired win rate: a tie is an interval that includes it",
}
# Sections that quote another measurement than the standard benchmark's, with why.
ALLOWED_SECTIONS = {
    ("docs/quickstart.md", "What it shows"): "the quickstart's own run on the starter set, printed as it ran",
}
# Where each block must appear: the README and the guide quote the result; the framework pages warn about the
# untrained prompter at their first example.
REQUIRED_BLOCKS = {
    "README.md": {"measured", "table", "prompter", "modes"},
    "docs/your-own-model.md": {"prompter", "modes"},
    "docs/concepts.md": {"prompter", "modes"},
    "docs/langchain.md": {"zero-shot", "modes"},
    "docs/dspy.md": {"zero-shot", "modes"},
}
META = {
    "command": "python -m benchmarks.run_benchmark",
    "date": "2026-12-06",
    "machine": "vm: 2 cores (test CPU), torch 2.13.0+cpu, no GPU",
    "git": "abc1234",
    "budget": {"eval_per_set": 2},
    "reward_accuracy": 0.676,
    "judge_accuracy": 0.687,
    "guidance_text": None,
}


# ---------------------------------------------------------------------------------------------- a real summary
class WordyTarget(CallableTarget):
    """Answers whose length follows the input and, sampled (best-of-n seeds torch's RNG), varies with each draw."""

    temperature = 0.0

    def __init__(self) -> None:
        super().__init__(len, name="wordy")

    def _generate(self, prompts: list[str]) -> list[str]:
        import torch

        def extra() -> int:
            return int(torch.randint(0, 9, ()).item()) if self.temperature else 0

        return [" ".join(["word"] * (len(p) % 11 + extra() + 1)) + f" ({p[-9:]})" for p in prompts]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_lm_dir) -> dict:
    """{"meta", "summary"} with the summary of a real (tiny) evaluation: every configuration the blocks read."""
    from alignpro_plugins.evaluation import (
        BestOfN,
        Evaluator,
        FixedTemplate,
        FrozenAlone,
        WithPrompter,
        WithRetryGate,
    )
    from alignpro_plugins.prompter import Prompter
    from alignpro_plugins.rewards import CallableReward, RewardFunction

    prompts = [f"Explain topic number {i} in a few words." for i in range(6)]
    target = WordyTarget()
    judges: dict[str, RewardFunction] = {
        "reward": CallableReward(lambda ps, ans: [sum(map(ord, a)) % 97 / 97 for a in ans], name="reward"),
        "independent": CallableReward(
            lambda ps, ans: [sum(map(ord, a)) % 89 / 89 for a in ans], name="independent"
        ),
    }
    zero_shot, prompter = Prompter.from_base(tiny_lm_dir), Prompter.from_base(tiny_lm_dir)
    zero_shot.manifest.generation.max_new_tokens, prompter.manifest.generation.max_new_tokens = 6, 4
    zero = WithPrompter(prompter=zero_shot, name="zero-shot")
    trained = WithPrompter(prompter=prompter)
    configs = [
        FrozenAlone(),
        FixedTemplate(),
        zero,
        trained,
        WithRetryGate(retry=[trained], threshold=0.5, name="align-pro-gated"),
        WithRetryGate.rerank([FixedTemplate(template="Answer in detail.", name="detail")]),
        BestOfN(n=2, temperature=0.7, seed=0),
    ]
    out = tmp_path_factory.mktemp("eval")
    report = Evaluator(prompts, target, judges, out_dir=out).run(configs)
    return {"meta": dict(META), "summary": json.loads(json.dumps(report.summary))}


def test_every_block_renders_from_the_summary_the_evaluator_writes(evaluated):
    blocks = render(evaluated)
    assert set(blocks) == set(docs_numbers.RENDERERS)
    summary = evaluated["summary"]
    for name in ("template", "zero-shot", "align-pro", "align-pro-gated", "rerank", "best-of-2"):
        entry = summary["configs"][name]["independent"]
        row = next(line for line in blocks["table"].splitlines() if line.startswith(f"| `{name}` |"))
        assert docs_numbers.win(entry["vs_reference"]) in row
        assert docs_numbers.win(entry["vs_reference_length_controlled"]) in row
    align = summary["configs"]["align-pro"]["independent"]
    assert docs_numbers.win(align["vs_reference"]) in blocks["prompter"]
    assert docs_numbers.win(summary["head_to_head"]["template"]["independent"]) in blocks["prompter"]
    rerank = summary["configs"]["rerank"]
    assert docs_numbers.win(rerank["independent"]["vs_reference"]) in blocks["modes"]
    assert "Against `best-of-2`" in blocks["modes"]  # the row at equal target calls
    pairs = rerank["selection"]["independent"]["agreement"]["pairs"]
    assert (
        pairs > 0
        and f"answer in {docs_numbers.pct(rerank['selection']['independent']['agreement']['agreement'])}"
        in (blocks["modes"])
    )
    assert f"of the {pairs} pairs rerank chose between" in blocks["modes"]
    assert (
        f"git {META['git']}" in blocks["measured"]
        and f"uses {summary['n_prompts']} held-out" in blocks["measured"]
    )
    for text in blocks.values():
        assert "nan" not in text.lower() and "{" not in text


def _with_interval(data: dict, low: float, high: float) -> dict:
    changed = copy.deepcopy(data)
    for name in ("align-pro", "zero-shot"):
        changed["summary"]["configs"][name]["independent"]["vs_reference"].update(
            win_rate=(low + high) / 2, ci_low=low, ci_high=high
        )
    return changed


@pytest.mark.parametrize(
    ("low", "high", "word", "advice"),
    [
        (0.55, 0.74, "wins", "A trained prompter is what"),
        (0.43, 0.61, "ties", "It does not make answers better"),
        (0.30, 0.46, "loses", "It makes answers worse"),
    ],
)
def test_the_words_follow_the_interval(evaluated, low, high, word, advice):
    blocks = render(_with_interval(evaluated, low, high))
    interval = f"[{100 * low:.0f}–{100 * high:.0f}]"
    assert re.search(rf"Against the bare prompt it {word}, [\d.]+% \{interval}", blocks["prompter"])
    assert f"{word}, " in blocks["zero-shot"] and advice in blocks["zero-shot"]


def test_a_prompter_that_writes_one_text_is_called_one_text(evaluated):
    data = copy.deepcopy(evaluated)
    data["meta"]["guidance_text"] = "Answer in detail."
    data["summary"]["configs"]["align-pro"]["outputs"] = {
        "distinct": 2,
        "n": 6,
        "top": "Answer in detail.",
        "top_share": 1.0,
    }
    text = render(data)["prompter"]
    assert (
        "writes the same text on 6 of the 6 held-out prompts: “Answer in detail.”, the text the guidance"
        in text
    )
    assert "It does not tailor its guidance to the prompt" in text
    # What that one text does follows the verdict against the bare prompt.
    for (low, high), effect in (
        ((0.55, 0.74), "its gain is that one text's."),
        ((0.43, 0.61), "that one text does not clearly win against the bare prompt."),
        ((0.30, 0.46), "that one text makes the answers worse."),
    ):
        judged = _with_interval(data, low, high)
        assert f"It does not tailor its guidance to the prompt; {effect}" in render(judged)["prompter"]
    data["summary"]["configs"]["align-pro"]["outputs"] = {
        "distinct": 5,
        "n": 6,
        "top": "A.",
        "top_share": 0.5,
    }
    assert "writes 5 different texts on 6 held-out prompts" in render(data)["prompter"]


def test_the_measured_block_names_the_target_the_run_recorded(evaluated):
    data = copy.deepcopy(evaluated)
    text = render(data)["measured"]  # the run recorded no target: the block names none
    assert "against the frozen target;" in text and "SmolLM2" not in text
    data["meta"]["target"] = "smollm2-135m-instruct"
    assert "against the frozen target (smollm2-135m-instruct);" in render(data)["measured"]
    del data["meta"]["target"]
    data["meta"]["budget"] |= {"target_model_name": "qwen", "target_base_url": "http://127.0.0.1:8000/v1"}
    assert "against the frozen target (qwen) served at http://127.0.0.1:8000/v1;" in render(data)["measured"]


# ---------------------------------------------------------------------------------------------- syncing pages
def _checkout(tmp_path: Path) -> Path:
    (tmp_path / "docs" / "recipes").mkdir(parents=True)
    (tmp_path / "README.md").write_text(
        "# x\n<!-- numbers:table:start -->\nold\n<!-- numbers:table:end -->\ntail\n"
    )
    (tmp_path / "docs" / "a.md").write_text(
        "<!-- numbers:zero-shot:start -->\n<!-- numbers:zero-shot:end -->\n"
    )
    (tmp_path / "docs" / "recipes" / "b.md").write_text("no blocks, 12% [3–40] anywhere\n")
    return tmp_path


def test_sync_rewrites_the_blocks_and_check_names_the_stale_pages(evaluated, tmp_path, capsys):
    root = _checkout(tmp_path / "checkout")
    summary = tmp_path / "benchmark-summary.json"
    summary.write_text(json.dumps(evaluated))
    args = ["--root", str(root), "--summary", str(summary)]
    assert main([*args, "--check"]) == 1
    assert "out of date: README.md, docs/a.md" in capsys.readouterr().err
    untouched = (root / "docs" / "recipes" / "b.md").read_text()
    assert main(args) == 0
    blocks = render(evaluated)
    readme = (root / "README.md").read_text()
    assert (
        readme == f"# x\n<!-- numbers:table:start -->\n{blocks['table']}\n<!-- numbers:table:end -->\ntail\n"
    )
    assert blocks["zero-shot"] in (root / "docs" / "a.md").read_text()
    assert (root / "docs" / "recipes" / "b.md").read_text() == untouched
    assert main([*args, "--check"]) == 0
    evaluated2 = _with_interval(evaluated, 0.30, 0.46)  # a new run: the pages are stale again
    summary.write_text(json.dumps(evaluated2))
    assert main([*args, "--check"]) == 1


def test_without_a_summary_the_blocks_say_the_numbers_are_pending(tmp_path, capsys):
    root = _checkout(tmp_path)
    args = ["--root", str(root), "--summary", str(tmp_path / "none.json")]
    assert main(args) == 0
    assert f"<!-- numbers:table:start -->\n{PENDING}\n" in (root / "README.md").read_text()
    assert main([*args, "--check"]) == 0
    assert "not found" in capsys.readouterr().err


def test_an_unknown_block_name_is_an_error_naming_the_known_ones():
    with pytest.raises(
        ValueError, match=r"README.md: unknown numbers block 'headline'; the blocks are measured, table"
    ):
        sync("<!-- numbers:headline:start -->\n<!-- numbers:headline:end -->", render(None), "README.md")


# ---------------------------------------------------------------------------------------------- committed pages
def _checked_pages() -> list[Path]:
    return [p for p in pages() if not str(p.relative_to(ROOT)).startswith(RECORD_PAGES)]


def _unmarked_percentages(page: Path) -> list[str]:
    """Percentages outside the marked blocks and the allowed sections, each with its line number."""
    rel = str(page.relative_to(ROOT))
    text = BLOCK.sub(lambda m: "\n" * m.group(0).count("\n"), page.read_text())
    found, section = [], ""
    for number, line in enumerate(text.splitlines(), start=1):
        if heading := re.match(r"#{1,6} (.+)", line):
            section = heading.group(1).strip()
        if (rel, section) in ALLOWED_SECTIONS:
            continue
        found += [
            f"{rel}:{number}: {m.group(0)}" for m in PERCENT.finditer(line) if m.group(0) not in ALLOWED
        ]
    return found


def test_the_committed_pages_quote_no_number_outside_a_generated_block():
    assert len(_checked_pages()) >= 15
    found = [hit for page in _checked_pages() for hit in _unmarked_percentages(page)]
    assert found == [], "results quoted by hand (put them in a numbers block or the allow-list, with why)"


def test_the_allow_list_is_used_and_small():
    assert len(ALLOWED) + len(ALLOWED_SECTIONS) <= 4
    for (page, section), _ in ALLOWED_SECTIONS.items():
        assert f"## {section}\n" in (ROOT / page).read_text(), f"{page} has no section {section!r}"
        assert PERCENT.search((ROOT / page).read_text()), f"{page}: nothing left to allow"


def test_the_pages_that_quote_the_result_hold_its_blocks():
    for rel, names in REQUIRED_BLOCKS.items():
        held = set(
            BLOCK.findall((ROOT / rel).read_text())
            and [m[0] for m in BLOCK.findall((ROOT / rel).read_text())]
        )
        assert names <= held, f"{rel} lacks the blocks {sorted(names - held)}"


def test_the_committed_pages_are_in_sync_with_the_committed_summary(capsys):
    # Before the standard run has written the summary, every block must say the numbers are pending.
    if docs_numbers.SUMMARY_FILE.exists():
        data = json.loads(docs_numbers.SUMMARY_FILE.read_text())
        assert set(data) == {"meta", "summary"} and {"command", "date", "machine", "git"} <= set(data["meta"])
    assert main(["--check"]) == 0, capsys.readouterr().err
