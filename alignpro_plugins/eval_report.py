"""Statistics over evaluation records, and the tables an evaluation summary is read in.

Every win rate comes with the same win at equal answer length (:func:`win_with_length_control`): reward models
and LLM judges favour longer answers, so a configuration can win on length alone. The tables are built from an
:class:`~alignpro_plugins.evaluation.Evaluator` summary, one function per table, so a benchmark can print the
tables it needs beside its own.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from alignpro_plugins import stats

#: :func:`scores_by_config`'s key for the answers' lengths in words, beside each judge's name.
ANSWER_WORDS = "answer words"


def answer_words(answer: str) -> int:
    """Answer length in whitespace-separated words: the same unit for every target and tokenizer."""
    return len(answer.split())


def paired_win(a: Sequence[dict], b: Sequence[dict], judge: str) -> dict[str, Any]:
    """a's win rate over b under ``judge`` (records paired by prompt, in the same order), with its bootstrap
    interval, and under ``length_controlled`` the same at equal answer length (:func:`stats.length_controlled_win_rate`)."""
    return win_with_length_control(
        [r["rewards"][judge] for r in a],
        [r["rewards"][judge] for r in b],
        [answer_words(r["answer"]) for r in a],
        [answer_words(r["answer"]) for r in b],
    )


def win_with_length_control(
    a: Sequence[float], b: Sequence[float], words_a: Sequence[float], words_b: Sequence[float]
) -> dict[str, Any]:
    """Paired scores a over b: the win rate (ties half) and, under ``length_controlled``, the win at equal length."""
    return {
        **stats.win_rate(a, b),
        "length_controlled": stats.length_controlled_win_rate(a, b, words_a, words_b),
    }


def scores_by_config(records: Sequence[dict]) -> dict[tuple[str, str], list[float]]:
    """(configuration, judge) -> its scores in prompt order, and (configuration, ANSWER_WORDS) -> its answers'
    lengths, from an evaluation's per-prompt records (written in any order; the prompt index pairs them)."""
    by: dict[tuple[str, str], list[float]] = defaultdict(list)
    for rec in sorted(records, key=lambda r: r["idx"]):
        for judge, r in rec["rewards"].items():
            by[rec["config"], judge].append(r)
        by[rec["config"], ANSWER_WORDS].append(answer_words(rec["answer"]))
    return by


def win_cells(by: dict[tuple[str, str], list[float]], a: str, b: str, judge: str) -> str:
    """Two table cells, configuration a over b under ``judge``: the win rate and the win at equal length."""
    w = win_with_length_control(by[a, judge], by[b, judge], by[a, ANSWER_WORDS], by[b, ANSWER_WORDS])
    return f"{format_win(w)} | {format_win(w['length_controlled'])}"


def prompter_outputs(rows: Sequence[dict]) -> dict[str, Any]:
    """What a configuration gave the target beside x: its distinct outputs and the share of the most common.

    The output is the prompter's rewrite (augment: the guidance it appended; a template: the template), and
    '' where x was passed through unchanged (a fallback), so a prompter that writes one text for every prompt
    shows ``distinct`` 1 and ``top_share`` 1.0.
    """
    return stats.most_common_share(["" if r["fallback_reason"] else r["rewrite"] or "" for r in rows])


def format_win(w: dict[str, Any]) -> str:
    """A win rate with its interval, e.g. '63.0% [54–72]'."""
    return f"{100 * w['win_rate']:.1f}% [{100 * w['ci_low']:.0f}–{100 * w['ci_high']:.0f}]"


def _fmt_var_ratio(entry: dict[str, Any]) -> str:
    """' (×ratio [low–high])' against the reference, or '' (the reference itself; results before the ratio)."""
    v = entry.get("variance_ratio_vs_reference")
    if not v or v["ratio"] != v["ratio"]:
        return ""
    return f" (×{v['ratio']:.2f} [{v['ci_low']:.2f}–{v['ci_high']:.2f}])"


def _fmt_diff(w: dict[str, Any]) -> str:
    if "mean_diff" not in w:  # results.json written before the paired mean difference was reported
        return "—"
    lo, hi = w["mean_diff_ci"]
    return f"{w['mean_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _fmt_lc(w: dict[str, Any] | None) -> str:
    """The win at equal answer length, or '—' (a summary written before it was reported)."""
    return format_win(w) if w else "—"


def _short(text: str | None, width: int = 70) -> str:
    if not text:
        return "(x unchanged)"
    one_line = " ".join(text.split()).replace("|", "\\|")
    return one_line if len(one_line) <= width else one_line[: width - 1] + "…"


def render_markdown(summary: dict[str, Any]) -> str:
    """The whole summary: the configurations' table, then each further table that has rows."""
    lines = [
        *configurations_lines(summary),
        *same_inputs_lines(summary),
        *outputs_lines(summary),
        *selection_lines(summary),
        *equal_calls_lines(summary),
        *head_to_head_lines(summary),
        *gap_closed_lines(summary),
    ]
    return "\n".join(lines) + "\n"


def configurations_lines(summary: dict[str, Any]) -> list[str]:
    """Every configuration: target calls, fallbacks, lengths, and per judge its mean, variance, win vs the
    reference and that win at equal length."""
    judges = summary["judges"]
    ref = summary["reference"]
    lines = [
        f'Prompts: {summary["n_prompts"]}. Win rates: ties count half; [95% bootstrap interval]; "at equal length": '
        "the same win with the answer-length difference regressed out (AlpacaEval's length control; judges favour "
        f"longer answers). Variance: across prompts, with (×its ratio to {ref}'s [paired 95% bootstrap interval]).",
        "",
    ]
    seen = {j: n for j, n in summary.get("judge_trained_on_prompts", {}).items() if n}
    if seen:
        lines[-1:] = [
            "Judges that trained on preference pairs for some of these prompts: "
            + ", ".join(f"{j} ({n} of {summary['n_prompts']})" for j, n in seen.items()),
            "",
        ]
    head = "| configuration | target calls / prompt | fallback | rewrite chars | answer words |"
    sep = "|---|---|---|---|---|"
    for j in judges:
        head += f" mean ({j}) | variance ({j}) | win vs {ref} ({j}) | at equal length ({j}) |"
        sep += "---|---|---|---|"
    lines += [head, sep]
    for name, e in summary["configs"].items():
        calls = e.get("target_calls_per_prompt", e["k"])
        words = e.get("mean_answer_words")
        row = (
            f"| {name} | {calls:.3g} | {100 * e['fallback_rate']:.0f}% | {e['mean_rewrite_chars']:.0f} | "
            f"{'—' if words is None else f'{words:.0f}'} |"
        )
        for j in judges:
            wr = format_win(e[j]["vs_reference"]) if "vs_reference" in e[j] else "—"
            lc = _fmt_lc(e[j].get("vs_reference_length_controlled")) if "vs_reference" in e[j] else "—"
            row += f" {e[j]['mean']:.3f} | {e[j]['variance']:.3f}{_fmt_var_ratio(e[j])} | {wr} | {lc} |"
        lines.append(row)
    return lines


def same_inputs_lines(summary: dict[str, Any]) -> list[str]:
    same = [
        f"{name} = {e['same_inputs_as']}" for name, e in summary["configs"].items() if "same_inputs_as" in e
    ]
    if not same:
        return []
    return [
        "",
        "Same target inputs as an earlier configuration, so answered and scored once: " + ", ".join(same),
    ]


def outputs_lines(summary: dict[str, Any]) -> list[str]:
    """Each prompter configuration's distinct outputs and the share of prompts given its most common one."""
    outputs = [(name, e["outputs"]) for name, e in summary["configs"].items() if e.get("outputs")]
    if not outputs:
        return []
    return [
        "",
        "What each prompter configuration gave the target beside x (the rewrite, or the guidance appended; x "
        "passed through counts as one output): distinct outputs, and the share of prompts given the most "
        "common one",
        "",
        "| configuration | distinct outputs | most common output's share | most common output |",
        "|---|---|---|---|",
        *(
            f"| {name} | {o['distinct']} of {o['n']} | {100 * o['top_share']:.0f}% | {_short(o['top'])} |"
            for name, o in outputs
        ),
    ]


def equal_calls_lines(summary: dict[str, Any]) -> list[str]:
    """Each configuration that asks more than once against best-of-n sampling with as many target calls."""
    rows = summary.get("equal_calls") or []
    if not rows:
        return []
    judges = summary["judges"]
    return [
        "",
        "At equal target calls: each configuration that asks the target more than once against sampling the "
        "frozen model n times on x and keeping the selection judge's best (best-of-n, n = its calls per prompt "
        "rounded up)",
        "",
        "| configuration | calls / prompt | against | calls / prompt | "
        + " | ".join(f"win ({j}) | at equal length ({j})" for j in judges)
        + " |",
        "|---|---|---|---|" + "---|---|" * len(judges),
        *(
            f"| {r['config']} | {r['calls']:.2f} | {r['against']} | {r['against_calls']:.2f} | "
            + " | ".join(f"{format_win(r[j])} | {_fmt_lc(r[j].get('length_controlled'))}" for j in judges)
            + " |"
            for r in rows
        ),
    ]


def head_to_head_lines(summary: dict[str, Any]) -> list[str]:
    if not summary["head_to_head"]:
        return []
    judges = summary["judges"]
    lines = [
        "",
        f"Head to head: {summary['focus']} against each configuration",
        "",
        "| against | "
        + " | ".join(f"win rate ({j}) | at equal length ({j}) | mean difference ({j})" for j in judges)
        + " |",
        "|---|" + "---|---|---|" * len(judges),
    ]
    for name, per_judge in summary["head_to_head"].items():
        lines.append(
            f"| {name} | "
            + " | ".join(
                f"{format_win(per_judge[j])} | {_fmt_lc(per_judge[j].get('length_controlled'))} | "
                f"{_fmt_diff(per_judge[j])}"
                for j in judges
            )
            + " |"
        )
    return lines


def gap_closed_lines(summary: dict[str, Any]) -> list[str]:
    if not summary["gap_closed"]:
        return []
    parts = [
        f"{j}: {100 * v:.0f}%" if v == v else f"{j}: undefined (the oracle is not above frozen)"
        for j, v in summary["gap_closed"].items()
    ]
    return ["", "Share of the frozen → RLHF-oracle gap closed: " + ", ".join(parts)]


def selection_lines(summary: dict[str, Any]) -> list[str]:
    """The selection table: for each configuration that chose between answers, how the other judges see it."""
    rows = [(name, e["selection"]) for name, e in summary["configs"].items() if e.get("selection")]
    selector = summary.get("selection_judge") or summary["judges"][0]
    others = [j for j in summary["judges"] if j != selector]
    if not rows or not others:
        return []
    ref = summary["reference"]
    lines = [
        "",
        f"Selection by {selector}: on the prompts where a configuration chose between answers, agreement is the share "
        f"of answer pairs (both judges telling them apart) where {selector} and the judge prefer the same answer; "
        f'"judge\'s best kept": the kept answer is also the judge\'s best; "had the judge chosen": the win vs {ref} '
        "had the judge picked among the same answers (the candidates' headroom)",
        "",
        "| configuration | target calls / prompt | prompts chosen between | "
        + " | ".join(
            f"agreement with {j} (pairs) | {j}'s best kept | win vs {ref} had {j} chosen" for j in others
        )
        + " |",
        "|---|---|---|" + "---|---|---|" * len(others),
    ]
    for name, sel in rows:
        calls = summary["configs"][name].get("target_calls_per_prompt", summary["configs"][name]["k"])
        cells = []
        for j in others:
            a = sel[j]["agreement"]
            agreement = (
                f"{100 * a['agreement']:.0f}% [{100 * a['ci_low']:.0f}–{100 * a['ci_high']:.0f}] ({a['pairs']})"
                if a["pairs"]
                else "— (0)"
            )
            kept = sel[j]["kept_is_judge_best"]
            headroom = sel[j].get("judge_choice_vs_reference")
            cells.append(
                f"{agreement} | {'—' if kept != kept else f'{100 * kept:.0f}%'} | "
                f"{format_win(headroom) if headroom else '—'}"
            )
        lines.append(
            f"| {name} | {calls:.2f} | {sel['prompts_chosen_between']} | " + " | ".join(cells) + " |"
        )
    return lines
