"""The numbers the docs quote, rendered from the standard benchmark's summary (docs/benchmark-summary.json).

`python -m benchmarks.run_benchmark` writes that file: {"meta": {command, date, machine, git, budget,
reward_accuracy, judge_accuracy, guidance_text, target (the frozen model's name; optional), ...}, "summary": <the
Evaluator's summary>}. A page that quotes a result holds it in a marked block, and this script writes every block
from that one file, so the README and the guides can never disagree with each other or with the run:

    <!-- numbers:NAME:start -->
    (generated: do not edit)
    <!-- numbers:NAME:end -->

    python -m benchmarks.docs_numbers            # rewrite the blocks of README.md and docs/**/*.md
    python -m benchmarks.docs_numbers --check    # exit 1, naming each page whose blocks are out of date

The blocks (one renderer each, the same text on every page that holds it): ``measured`` (what was measured, by
what command, when, on what), ``table`` (each configuration's target calls and win against the bare prompt, also at
equal answer length), ``prompter`` (what the trained prompter appends, against the bare prompt and the fixed
instruction), ``modes`` (rerank and the retry gate, against best-of-n at equal target calls, and how often the
selecting reward and the independent judge agree), ``zero-shot`` (the untrained prompter). Wording that depends on
a result ("wins", "ties", "loses") is decided from the interval, never written by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_FILE = ROOT / "docs" / "benchmark-summary.json"
BLOCK = re.compile(r"<!-- numbers:([\w-]+):start -->\n(.*?)<!-- numbers:\1:end -->", re.S)
# Shown in every block until the standard run's summary exists.
PENDING = (
    "*These numbers are rendered from the standard benchmark's summary (`docs/benchmark-summary.json`), which "
    "has not been generated in this checkout yet: run `python -m benchmarks.run_benchmark`, then "
    "`python -m benchmarks.docs_numbers`. Until then, docs/benchmarks.md holds the earlier runs.*"
)
JUDGE, TRAINING = "independent", "reward"

# The configurations of the headline table, in order, each with what the frozen model is asked (the others, the
# variances and both judges' full tables are in docs/benchmarks.md).
TABLE_ROWS = (
    ("frozen", "the bare prompt x"),
    ("template", "x + the fixed default instruction"),
    ("zero-shot", "x + the untrained prompter's guidance"),
    ("align-pro", "x + the trained prompter's guidance"),
    ("align-pro-gated", "x; the rewrite too where the training reward scores x's answer low (retry gate)"),
    ("best-of-2", "x twice, sampled; the training reward keeps the better answer"),
    ("rerank-template", "x and x + the default instruction; the training reward keeps the better answer"),
    ("rerank", "x and the prompter's rewrite; the training reward keeps the better answer"),
)
# How the modes' equal-calls baselines are named in a sentence.
SAMPLED = {
    2: "x answered twice, sampled",
    3: "x answered three times, sampled",
    4: "x answered four times, sampled",
}


def pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def win(w: dict[str, Any]) -> str:
    """'64.0% [55–74]': a win rate with its 95% interval."""
    return f"{pct(w['win_rate'])} [{100 * w['ci_low']:.0f}–{100 * w['ci_high']:.0f}]"


def _word(w: dict[str, Any]) -> str:
    """'wins' (the interval is above 50%), 'loses' (below) or 'ties' (it includes 50%)."""
    return "wins" if w["ci_low"] > 0.5 else "loses" if w["ci_high"] < 0.5 else "ties"


def verdict(w: dict[str, Any]) -> str:
    """'wins, 64.0% [55–74]', 'ties, 52.0% [43–61]' (the interval includes 50%) or 'loses, 40.0% [31–49]'."""
    return f"{_word(w)}, {win(w)}"


def _config(summary: dict, name: str) -> dict[str, Any]:
    try:
        return summary["configs"][name]
    except KeyError:
        raise ValueError(
            f"the summary has no {name!r} configuration; it has {sorted(summary['configs'])}"
        ) from None


def measured(data: dict) -> str:
    meta, summary = data["meta"], data["summary"]
    budget = meta.get("budget") or {}
    name = meta.get("target") or budget.get("target_model_name")  # what the run recorded, if anything
    target = f"the frozen target ({name})" if name else "the frozen target"
    served = f" served at {budget['target_base_url']}" if budget.get("target_base_url") else ""
    return (
        f"Measured by the standard benchmark (`{meta['command']}`, {meta['date']}, git {meta['git']}; "
        f"{meta['machine']}). Every stage was trained from scratch on public data against {target}{served}; the "
        f"evaluation uses {summary['n_prompts']} held-out prompts that no stage trained on. Two reward models "
        "score every answer against the original prompt: the training "
        f"reward the prompter was trained against (held-out pairwise accuracy {meta['reward_accuracy']:.2f}) and "
        f"an independent judge trained on disjoint prompts ({meta['judge_accuracy']:.2f}), whose numbers come "
        "first. Win rates are paired, count ties as half and carry a 95% bootstrap interval; *at equal length* "
        "regresses out the difference in answer length, since both judges prefer longer answers."
    )


def table(data: dict) -> str:
    summary = data["summary"]
    lines = [
        "| configuration | the frozen model is asked | target calls per prompt | win vs bare prompt (independent "
        "judge) | at equal length | win vs bare prompt (training reward) |",
        "|---|---|---|---|---|---|",
    ]
    for name, asked in TABLE_ROWS:
        if name not in summary["configs"]:
            continue
        c = summary["configs"][name]
        calls = f"{c['target_calls_per_prompt']:g}"
        if name == summary["reference"]:
            lines.append(f"| `{name}` | {asked} | {calls} | — | — | — |")
            continue
        lines.append(
            f"| `{name}` | {asked} | {calls} | {win(c[JUDGE]['vs_reference'])} | "
            f"{win(c[JUDGE]['vs_reference_length_controlled'])} | {win(c[TRAINING]['vs_reference'])} |"
        )
    return "\n".join(lines)


def prompter(data: dict) -> str:
    meta, summary = data["meta"], data["summary"]
    c = _config(summary, "align-pro")
    outputs = c["outputs"]
    top = " ".join(outputs["top"].split()) or "(the prompt unchanged)"
    if outputs["top_share"] >= 0.9:
        what = (
            f"writes the same text on {round(outputs['top_share'] * outputs['n'])} of the {outputs['n']} held-out "
            f"prompts: “{top}”"
        )
        if meta.get("guidance_text") and top == meta["guidance_text"]:
            what += ", the text the guidance search chose"
        effect = {
            "wins": "its gain is that one text's",
            "ties": "that one text does not clearly win against the bare prompt",
            "loses": "that one text makes the answers worse",
        }[_word(c[JUDGE]["vs_reference"])]
        what += f". It does not tailor its guidance to the prompt; {effect}."
    else:
        what = (
            f"writes {outputs['distinct']} different texts on {outputs['n']} held-out prompts; the most common, "
            f"on {pct(outputs['top_share'])} of them, is “{top}”."
        )
    frozen = _config(summary, summary["reference"])
    sentences = [
        f"**The trained prompter** {what}",
        f"Against the bare prompt it {verdict(c[JUDGE]['vs_reference'])} under the independent judge "
        f"({win(c[TRAINING]['vs_reference'])} under the training reward); at equal answer length it "
        f"{verdict(c[JUDGE]['vs_reference_length_controlled'])}. Its answers average "
        f"{c['mean_answer_words']:.0f} words, the bare prompt's {frozen['mean_answer_words']:.0f}.",
    ]
    h2h = summary.get("head_to_head", {})
    if "template" in h2h:
        t = h2h["template"][JUDGE]
        sentences.append(
            f"Against the fixed default instruction it {verdict(t)}; at equal length it "
            f"{verdict(t['length_controlled'])}."
        )
    if "template-picked" in h2h:
        sentences.append(
            f"Against the best fixed text picked on the training prompts it {verdict(h2h['template-picked'][JUDGE])}."
        )
    return " ".join(sentences)


def modes(data: dict) -> str:
    summary = data["summary"]
    c = _config(summary, "rerank")
    equal = {row["config"]: row for row in summary.get("equal_calls", [])}
    sentences = [
        "**Deployment modes** run the training reward at inference and ask the frozen model more than once. "
        "Rerank answers x and the prompter's rewrite and keeps the answer the training reward prefers "
        f"({c['target_calls_per_prompt']:g} target calls per prompt): against the bare prompt it "
        f"{verdict(c[JUDGE]['vs_reference'])} under the independent judge; at equal length it "
        f"{verdict(c[JUDGE]['vs_reference_length_controlled'])}."
    ]
    if "rerank" in equal:
        e = equal["rerank"]
        described = SAMPLED.get(int(e["against_calls"]), e["against"])
        sentences.append(
            f"Against `{e['against']}` ({described}, the training reward keeping the best answer), which spends "
            f"as many target calls, it {verdict(e[JUDGE])}; "
            f"at equal length it {verdict(e[JUDGE]['length_controlled'])}."
        )
    agreement = c.get("selection", {}).get(JUDGE, {}).get("agreement")
    if agreement and agreement.get("pairs"):
        sentences.append(
            "The training reward, which picks, and the independent judge, which only judges, prefer the same "
            f"answer in {pct(agreement['agreement'])} [{100 * agreement['ci_low']:.0f}–"
            f"{100 * agreement['ci_high']:.0f}] of the {agreement['pairs']} pairs rerank chose between."
        )
    if "align-pro-gated" in summary["configs"]:
        g = summary["configs"]["align-pro-gated"]
        sentences.append(
            "The retry gate asks again only where the first answer scores low: "
            f"{g['target_calls_per_prompt']:.2f} target calls per prompt; against the bare prompt it "
            f"{verdict(g[JUDGE]['vs_reference'])}."
        )
        if "align-pro-gated" in equal:
            e = equal["align-pro-gated"]
            sentences.append(
                f"Against `{e['against']}`, which spends more calls, the gate {verdict(e[JUDGE])}."
            )
    return " ".join(sentences)


def zero_shot(data: dict) -> str:
    w = _config(data["summary"], "zero-shot")[JUDGE]["vs_reference"]
    trained = (
        "deploy a trained prompter instead (the shipped one for SmolLM2, or one trained for your model)."
    )
    advice = {
        "loses": f"It makes answers worse: {trained}",
        "ties": f"It does not make answers better: {trained}",
        "wins": "A trained prompter is what the rest of this page measures.",
    }[_word(w)]
    return (
        f"Against the bare prompt, **an untrained (zero-shot) prompter** (the base model asked to add guidance) "
        f"{verdict(w)}, under the standard benchmark's independent judge. {advice}"
    )


RENDERERS: dict[str, Callable[[dict], str]] = {
    "measured": measured,
    "table": table,
    "prompter": prompter,
    "modes": modes,
    "zero-shot": zero_shot,
}


def render(data: dict | None) -> dict[str, str]:
    """Every block's text from the summary file's contents (None: the summary does not exist yet)."""
    return {name: PENDING if data is None else fn(data) for name, fn in RENDERERS.items()}


def pages(root: Path = ROOT) -> list[Path]:
    """README.md and every page under docs/."""
    return [root / "README.md", *sorted((root / "docs").glob("**/*.md"))]


def sync(text: str, blocks: dict[str, str], where: str = "page") -> str:
    """``text`` with every marked block rewritten; an unknown block name is an error naming the known ones."""

    def replace(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in blocks:
            raise ValueError(f"{where}: unknown numbers block {name!r}; the blocks are {', '.join(blocks)}")
        return f"<!-- numbers:{name}:start -->\n{blocks[name]}\n<!-- numbers:{name}:end -->"

    return BLOCK.sub(replace, text)


def load_summary(path: Path = SUMMARY_FILE) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page is out of date")
    ap.add_argument("--summary", type=Path, default=SUMMARY_FILE, help="the standard run's summary file")
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout whose README.md and docs/ to sync")
    args = ap.parse_args(argv)
    data = load_summary(args.summary)
    if data is None:
        print(f"{args.summary}: not found; the blocks say the numbers are pending", file=sys.stderr)
    blocks = render(data)
    stale = []
    for page in pages(args.root):
        text = page.read_text()
        new = sync(text, blocks, str(page.relative_to(args.root)))
        if new != text:
            stale.append(str(page.relative_to(args.root)))
            if not args.check:
                page.write_text(new)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}; run `python -m benchmarks.docs_numbers`", file=sys.stderr)
        return 1
    print(
        f"{'checked' if args.check else 'synced'} {len(pages(args.root))} pages; changed: {stale or 'none'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
