"""What a stronger reward model changes: standard runs that differ only in their reward model (and judge), each
run's training reward, guidance search, prompter and rerank measured by one independent judge.

    python -m benchmarks.run_benchmark --skip-oracle --out runs/bench-rm --answers-from runs/bench
    python -m benchmarks.reward_strength --run "80 steps=runs/bench" --run "full pass=runs/bench-rm"

For each run, on the same pairs and prompts: the training reward's held-out pairwise accuracy (all pairs and
length-matched ones: the last run's shard-0 held-out pairs, minus any prompt a compared reward trained on), the
guidance search's text and what the prompter writes, and on the benchmark's 100 held-out prompts the prompter's
and rerank's win rates against the frozen model under the judge (all and at equal answer length), with the share
of rerank's answer pairs where the training reward and the judge prefer the same answer. The judge is the last
run's (--judge to choose another). Answers come from each run's evaluation cache: only scoring is new.
The section goes to docs/benchmarks.md (under "Reward models").
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from alignpro_plugins import stats
from alignpro_plugins.eval_report import format_win
from alignpro_plugins.rewards import load_reward, prompt_digest
from benchmarks.run_benchmark import (
    BUDGETS,
    eval_prompts,
    first_tries,
    publish,
    reranks,
    reward_config,
    run_lines,
    side_evaluation,
)
from trainers.reward_metrics import pairwise_metrics, score_pairs, word_count
from trainers.reward_trainer import AlignProRewardTrainer

SECTION_KEY = "reward-strength"


def parse_run(spec: str) -> tuple[str, Path]:
    name, sep, folder = spec.partition("=")
    if not sep or not name.strip() or not folder.strip():
        raise argparse.ArgumentTypeError(
            f"--run takes NAME=FOLDER (e.g. 'full pass=runs/bench-rm'), got {spec!r}"
        )
    path = Path(folder.strip())
    for need in ("reward/alignpro_reward.json", "rl-kl/alignpro.json", "eval/target_cache.jsonl"):
        if not (path / need).exists():
            raise argparse.ArgumentTypeError(
                f"--run {spec!r}: {path / need} is missing; give the --out of a finished run_benchmark run"
            )
    return name.strip(), path


def heldout_pairs(runs: dict[str, Path]) -> list:
    """The last run's training-reward held-out pairs, without a prompt any compared reward trained on."""
    last = list(runs.values())[-1]
    config = reward_config(last / "reward", BUDGETS["standard"], shard=0)
    pairs = AlignProRewardTrainer(config).eval_pairs
    trained_on = set()
    for folder in runs.values():
        trained_on |= set(
            json.loads((folder / "reward" / "alignpro_reward.json").read_text())["train_prompt_digests"]
        )
    return [p for p in pairs if prompt_digest(p.prompt) not in trained_on]


def evaluate(folder: Path, judge: Any):
    """frozen, the run's prompter and rerank on the benchmark's prompts: its training reward selects, the judge
    scores. A side folder under the run holds the records; the run's own evaluation stays as it was."""
    from alignpro_plugins.evaluation import Evaluator, WithPrompter
    from alignpro_plugins.prompter import Prompter

    budget = BUDGETS["standard"]
    ev_dir, target = side_evaluation(folder, budget, f"eval-judge-{judge.tag}")
    prompter = Prompter.from_pretrained(folder / "rl-kl")
    align_pro = WithPrompter(prompter=prompter, description="the run's Align-Pro prompter")
    tries = first_tries(prompter.manifest.mode)
    rerank = next(c for c in reranks(tries, align_pro) if c.name == "rerank")
    scorers = {"reward": load_reward(str(folder / "reward")), "independent": judge.reward}
    return Evaluator(eval_prompts(budget), target, scorers, out_dir=ev_dir).run([tries[0], align_pro, rerank])


def judged(report: Any, config: str) -> tuple[list[float], list[float]]:
    """A configuration's judge scores and answer words, in prompt order."""
    rows = sorted((r for r in report.records if r["config"] == config), key=lambda r: r["idx"])
    return [r["rewards"]["independent"] for r in rows], [float(word_count(r["answer"])) for r in rows]


def head_to_head(report: Any, first: Any) -> str:
    """This run's prompter against the first row's, paired by prompt, all and at equal length."""
    (a, len_a), (b, len_b) = judged(report, "align-pro"), judged(first, "align-pro")
    return (
        f"{format_win(stats.win_rate(a, b))} | "
        f"{format_win(stats.length_controlled_win_rate(a, b, len_a, len_b))}"
    )


class Judge:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.reward = load_reward(str(folder))
        self.meta = json.loads((folder / "alignpro_reward.json").read_text())
        self.tag = folder.parent.name  # the run it came from: names the side-evaluation folder


def win_pair(entry: dict[str, Any]) -> str:
    judged = entry["independent"]
    return f"{format_win(judged['vs_reference'])} | {format_win(judged['vs_reference_length_controlled'])}"


def section(runs: dict[str, Path], judge: Judge, started: float) -> str:
    from trainers.guidance_search_trainer import GuidanceSearchResult

    pairs = heldout_pairs(runs)
    head = [
        f"- judge: `{judge.folder}` (held-out pairwise accuracy {judge.meta['heldout_pairwise_accuracy']:.3f}, "
        f"length-matched {judge.meta['heldout_pairwise_accuracy_length_matched']:.3f}), the same for every row",
        f"- held-out pairs: {len(pairs)} (the shard-0 held-out pairs of `{list(runs.values())[-1]}`, no prompt any "
        "row's reward trained on); win rates on the benchmark's 100 held-out prompts, against the frozen model, "
        "all and at equal answer length",
        "",
        "| training reward | steps | held-out accuracy | length-matched | guidance search's text | prompter writes it "
        "| prompter | at equal length | rerank | at equal length | rerank's pairs: reward agrees with the judge "
        "| prompter against the first row's | at equal length |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines: list[str] = []
    first = None
    for name, folder in runs.items():
        meta = json.loads((folder / "reward" / "alignpro_reward.json").read_text())
        metrics = pairwise_metrics(pairs, *score_pairs(load_reward(str(folder / "reward")), pairs))
        report = evaluate(folder, judge)
        first = first or report
        configs = report.summary["configs"]
        agree = configs["rerank"]["selection"]["independent"]["agreement"]
        searched = GuidanceSearchResult.load(folder / "guidance").best or "(no change)"
        outputs = configs["align-pro"]["outputs"]
        writes = f"{100 * outputs['top_share']:.0f}%" if outputs["top"] == searched else "no"
        lines.append(
            f"| {name} | {meta['steps']} | {metrics['pairwise_accuracy']:.3f} | "
            f"{metrics['pairwise_accuracy_length_matched']:.3f} (n={metrics['n_pairs_length_matched']}) | "
            f'"{searched}" | {writes} | {win_pair(configs["align-pro"])} | {win_pair(configs["rerank"])} | '
            f"{100 * agree['agreement']:.0f}% [{100 * agree['ci_low']:.0f}–{100 * agree['ci_high']:.0f}] | "
            f"{'— | —' if report is first else head_to_head(report, first)} |"
        )
    lines = ["### The standard run under each training reward", "", *run_lines(started), *head, *lines]
    lines += [
        "",
        "Each run is a full standard run (`run_benchmark`) with its own reward model and judge; this table "
        "re-scores both runs' answers by one judge, so the rows differ only in the training reward and what it chose.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--run",
        action="append",
        type=parse_run,
        required=True,
        metavar="NAME=FOLDER",
        help="a finished standard run (run_benchmark's --out) and its row's name; give two or more",
    )
    ap.add_argument(
        "--judge", default=None, help="the judging reward model folder (default: the last run's judge)"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-docs", action="store_true", help="print the section, leave docs/ alone")
    args = ap.parse_args()
    runs = dict(args.run)
    if len(runs) < 2:
        ap.error("give two or more --run NAME=FOLDER (distinct names) to compare")
    started = time.time()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    judge = Judge(Path(args.judge) if args.judge else list(runs.values())[-1] / "judge")
    text = section(runs, judge, started)
    last = list(runs.values())[-1]
    publish(text, last / "eval" / "reward_strength_section.md", SECTION_KEY, docs=not args.no_docs)


if __name__ == "__main__":
    main()
