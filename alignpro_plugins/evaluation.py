"""Evaluation harness: named configurations answered by the frozen target and scored under several judges.

Each configuration (:mod:`alignpro_plugins.configurations`, re-exported here) says how a prompt x becomes the
target's input (and, for the RLHF oracle, which model answers). Every configuration is scored on the same
prompts by every judge, so all statistics are paired: mean reward, reward variance, win rate against the frozen
model alone with a bootstrap 95% interval and the same win at equal answer length, head-to-head win rates, the
share of the frozen→oracle gap closed, fallback rate and rewrite length. A configuration that asks the target
more than once (best-of-K, best-of-n, the gate, rerank) keeps the answer the selection judge (the first judge)
scores best, through :class:`RetryGate`'s flow; its target calls per prompt, its agreement with the other judges
on the answers it chose between, and the best-of-n sampling baseline with as many calls are reported beside it.
:class:`RefineAndKeepBetter` is the gate with a refinement prompter: it reads the first answer before writing the
second input, and its records keep the guidance it wrote. Records are written incrementally, so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from alignpro_plugins import stats
from alignpro_plugins.configurations import (
    BestOfK,
    BestOfN,
    Configuration,
    FixedTemplate,
    FrozenAlone,
    Oracle,
    RefineAndKeepBetter,
    TargetInput,
    WithPrompter,
    WithRetryGate,
    refinement_kinds,
)
from alignpro_plugins.eval_report import answer_words, paired_win, prompter_outputs, render_markdown
from alignpro_plugins.extras import require
from alignpro_plugins.gate import GateResult, RetryGate, retry_threshold
from alignpro_plugins.refining import first_answer
from alignpro_plugins.rewards import RewardFunction, judge_identity, prompts_trained_on
from alignpro_plugins.targets import FrozenTarget, append_jsonl, read_jsonl_rows
from alignpro_plugins.targets.sampled import SampledTarget

logger = logging.getLogger(__name__)

# The configurations, the sampler behind best-of-n and the report helpers are imported from here too.
__all__ = [
    "BestOfK",
    "BestOfN",
    "Configuration",
    "EvalReport",
    "Evaluator",
    "FixedTemplate",
    "FrozenAlone",
    "Oracle",
    "PairwiseLLMJudge",
    "RefineAndKeepBetter",
    "SampledTarget",
    "TargetInput",
    "WithPrompter",
    "WithRetryGate",
    "answer_words",
    "plot_distributions",
    "plot_training_curve",
    "prompter_outputs",
    "refinement_kinds",
    "render_markdown",
    "retry_threshold",
]


@dataclass
class _Judged:
    """A target answer and every judge's score of it against its original prompt."""

    text: str
    rewards: dict[str, float] = field(default_factory=dict)


class PairwiseLLMJudge:
    """Asks an LLM (any target backend) which of two answers is better, in both orders to cancel position bias."""

    TEMPLATE = (
        "Which response answers the user's request better? Reply with exactly one letter, A or B.\n\n"
        "Request:\n{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\nBetter response (A or B):"
    )

    def __init__(self, target: FrozenTarget) -> None:
        self.target = target

    @staticmethod
    def _choice(text: str) -> str | None:
        m = re.search(r"\b([AB])\b", text.strip().upper())
        return m.group(1) if m else None

    def prefer(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Per prompt, P(a better than b): 1, 0.5 (split or unparseable) or 0."""
        ab = [self.TEMPLATE.format(prompt=p, a=x, b=y) for p, x, y in zip(prompts, a, b, strict=True)]
        ba = [self.TEMPLATE.format(prompt=p, a=y, b=x) for p, x, y in zip(prompts, a, b, strict=True)]
        outs = self.target.generate(ab + ba)
        n = len(ab)
        scores = []
        for first, second in zip(outs[:n], outs[n:], strict=True):
            votes = [
                {"A": 1.0, "B": 0.0}.get(self._choice(first) or "", 0.5),
                {"B": 1.0, "A": 0.0}.get(self._choice(second) or "", 0.5),
            ]
            scores.append(sum(votes) / 2)
        return scores


@dataclass
class EvalReport:
    configs: list[str]
    judges: list[str]
    summary: dict[str, Any]
    records: list[dict[str, Any]] = field(repr=False, default_factory=list)

    def to_markdown(self) -> str:
        return render_markdown(self.summary)


class Evaluator:
    def __init__(
        self,
        prompts: Sequence[str],
        target: FrozenTarget,
        judges: dict[str, RewardFunction],
        *,
        out_dir: str | Path | None = None,
        reference: str = "frozen",
        focus: str = "align-pro",
        pairwise_judge: PairwiseLLMJudge | None = None,
        chunk_size: int = 16,
    ) -> None:
        if not judges:
            raise ValueError("give at least one judge (a reward model or reward function)")
        self.prompts = list(prompts)
        self.target = target
        self.judges = judges
        self.selection_judge = next(iter(judges))
        self.out_dir = Path(out_dir) if out_dir else None
        self.reference = reference
        self.focus = focus
        self.pairwise_judge = pairwise_judge
        self.chunk_size = chunk_size
        # A judge that trained on preference pairs for an evaluation prompt has seen it: count and say so.
        seen = {name: prompts_trained_on(judge, self.prompts) for name, judge in judges.items()}
        self.judge_trained_on_prompts = {name: n for name, n in seen.items() if n is not None}
        for name, n in self.judge_trained_on_prompts.items():
            if n:
                logger.warning(
                    "judge %r trained on preference pairs for %d of the %d evaluation prompts; exclude them when "
                    "training it (reward stage: exclude_prompt_files)",
                    name,
                    n,
                    len(self.prompts),
                )

    # ------------------------------------------------------------------ records
    def _records_path(self) -> Path | None:
        return self.out_dir / "records.jsonl" if self.out_dir else None

    def _fingerprint(self, cfg: Configuration) -> str:
        """What a record of ``cfg`` depends on: its setup, the target that answers it and every judge.

        A record answered by another shared target (model, URL, answer cap) or scored by another judge under the
        same name (a reward model retrained in place has new weights) must not be resumed.
        """
        parts = [cfg.fingerprint()]
        if cfg.target is None:  # a configuration with its own target has it in cfg.fingerprint()
            parts += [self.target.identity, json.dumps(self.target.settings, sort_keys=True, default=str)]
        parts += [f"{name}={judge_identity(judge)}" for name, judge in sorted(self.judges.items())]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def _load_done(self, fingerprints: dict[str, str]) -> dict[tuple[str, int], dict]:
        """Records of an earlier run that still apply: same configuration setup, target and judges, same prompt.

        Matched by prompt text, not position, so a grown or reordered prompt set reuses every record it can.
        """
        path = self._records_path()
        done: dict[tuple[str, int], dict] = {}
        positions: dict[str, list[int]] = {}
        for i, x in enumerate(self.prompts):
            positions.setdefault(x, []).append(i)
        if path and path.exists():
            # A line cut off by an interrupted run is skipped (with a warning); its cell is computed again.
            for row in read_jsonl_rows(path, required=("config", "prompt", "rewards", "answer")):
                if not (
                    isinstance(row["config"], str)
                    and isinstance(row["prompt"], str)
                    and isinstance(row["rewards"], dict)
                ):
                    continue  # not a record this harness wrote
                if row.get("fingerprint") != fingerprints.get(row["config"]) or set(row["rewards"]) != set(
                    self.judges
                ):
                    continue
                for i in positions.get(row["prompt"], []):
                    done[(row["config"], i)] = {**row, "idx": i}
        return done

    def _append(self, rows: list[dict]) -> None:
        path = self._records_path()
        if path:
            append_jsonl(path, [json.dumps(r, ensure_ascii=False) for r in rows])

    def _choose(self, cfg: Configuration, target: FrozenTarget, prompts: list[str]) -> list[GateResult]:
        """Per prompt, the candidates asked and the one the selection judge keeps, through :class:`RetryGate`.

        A gate asks its retry inputs only where the first answer scores below its threshold. Every other
        configuration is the gate with no threshold (``RetryGate.rerank``) over its own candidates: one input
        (frozen, template, a prompter) is simply answered and scored; best-of-K and best-of-n have every candidate
        answered and keep the best-scored one (the first of equals).
        """
        selector = self.judges[self.selection_judge]
        if isinstance(cfg, RefineAndKeepBetter):
            gate = RetryGate(selector, cfg.gate_threshold)
            first = [c for [c] in cfg.inputs(prompts)]

            def more(below: list[int]) -> list[list[TargetInput]]:
                # Inside the gate's retry step each prompt's first answer is known (see alignpro_plugins.refining).
                xs = [prompts[j] for j in below]
                answers: list[str] = []
                for x in xs:
                    answer = first_answer(x)
                    if answer is None:  # refining from "" would score a refinement of nothing
                        raise RuntimeError(
                            f"{cfg.name}: no first answer to refine for the prompt {x!r} in the gate's retry step"
                        )
                    answers.append(answer)
                return cfg.refine_inputs(xs, answers)

        elif isinstance(cfg, WithRetryGate):
            gate = RetryGate(selector, cfg.threshold)
            first = [c for [c] in cfg.inputs(prompts)]

            def more(below: list[int]) -> list[list[TargetInput]]:
                return cfg.retry_inputs([prompts[j] for j in below])

        else:
            rows = cfg.inputs(prompts)
            gate = RetryGate.rerank(selector)
            first = [row[0] for row in rows]

            def more(below: list[int]) -> list[list[TargetInput]]:
                return [rows[j][1:] for j in below]

        def ask(inputs: list[TargetInput]) -> list[_Judged]:
            return self._judged(target.generate([c.request() for c in inputs]))

        return gate.choose(prompts, first, ask, more, text=lambda a: a.text, score=self._score)

    @staticmethod
    def _judged(answers: Sequence[str]) -> list[_Judged]:
        return [_Judged(a) for a in answers]

    def _score(self, prompts: list[str], answers: list[_Judged]) -> list[float]:
        """Every judge scores these answers (one call each); returns the selection judge's scores."""
        scores = {
            name: list(judge(prompts, [a.text for a in answers])) for name, judge in self.judges.items()
        }
        for m, a in enumerate(answers):
            a.rewards = {name: s[m] for name, s in scores.items()}
        return scores[self.selection_judge]

    def _run_config(self, cfg: Configuration, done: dict) -> list[dict]:
        fingerprint = self._fingerprint(cfg)
        todo = [i for i in range(len(self.prompts)) if (cfg.name, i) not in done]
        target = cfg.answering(self.target)
        rows = [done[(cfg.name, i)] for i in range(len(self.prompts)) if (cfg.name, i) in done]
        for s in tqdm(range(0, len(todo), self.chunk_size), desc=f"eval {cfg.name}", disable=not todo):
            idx = todo[s : s + self.chunk_size]
            prompts = [self.prompts[i] for i in idx]
            new = [
                {
                    **self._record(cfg.name, i, self.prompts[i], result, fingerprint),
                    **cfg.record_extra(self.prompts[i]),
                }
                for i, result in zip(idx, self._choose(cfg, target, prompts), strict=True)
            ]
            self._append(new)
            rows += new
        return sorted(rows, key=lambda r: r["idx"])

    @staticmethod
    def _record(config: str, idx: int, prompt: str, result: GateResult, fingerprint: str) -> dict[str, Any]:
        """One prompt's record: the kept input and answer, every judge's score, the target calls it took, and
        where it chose between answers, every candidate's scores and which one it kept."""
        kept: TargetInput = result.input
        answer: _Judged = result.answer
        record = {
            "config": config,
            "idx": idx,
            "prompt": prompt,
            "input": kept.text,
            "rewrite": kept.generated,
            "fallback_reason": kept.fallback_reason,
            "answer": answer.text,
            "rewards": answer.rewards,
            "k": len(result.candidates),
            "fingerprint": fingerprint,
        }
        if len(result.candidates) > 1:
            record["candidates"] = [
                {"rewards": c.answer.rewards, "words": answer_words(c.answer.text)} for c in result.candidates
            ]
            record["kept"] = result.kept
        return record

    def _reuse(self, cfg: Configuration, source: str, source_rows: list[dict], done: dict) -> list[dict]:
        """``cfg``'s records copied from a configuration with the same inputs (see ``same_inputs_key``).

        Always the source's records, so the twins agree; a copy that is missing from the records file or
        differs from the one there (answered on its own by an older run) is appended, and the last wins on resume.
        (Records are matched by prompt text: a prompt listed twice resumes with its last record at both places.)
        """
        logger.info("%s: same inputs as %s; its answers and rewards are reused", cfg.name, source)
        fingerprint = self._fingerprint(cfg)
        rows = [r | {"config": cfg.name, "fingerprint": fingerprint} for r in source_rows]
        self._append([r for r in rows if done.get((cfg.name, r["idx"])) != r])
        return rows

    @staticmethod
    def _same_inputs_key(cfg: Configuration) -> str | None:
        # The class is part of the key: a subclass may build its inputs differently under the same key.
        key = cfg.same_inputs_key()
        return None if key is None else f"{type(cfg).__module__}.{type(cfg).__qualname__}:{key}"

    # ------------------------------------------------------------------ run
    def run(self, configs: Sequence[Configuration]) -> EvalReport:
        names = [c.name for c in configs]
        if len(set(names)) != len(names):
            raise ValueError(f"configuration names must be unique, got {names}")
        if self.reference not in names:
            raise ValueError(f"the reference configuration {self.reference!r} is not among {names}")
        done = self._load_done({c.name: self._fingerprint(c) for c in configs})
        by_config: dict[str, list[dict]] = {}
        first_with: dict[str, str] = {}  # same-inputs key -> the configuration that was answered
        same_as: dict[str, str] = {}
        for c in configs:
            key = self._same_inputs_key(c)
            if key in first_with:
                same_as[c.name] = first_with[key]
                by_config[c.name] = self._reuse(c, first_with[key], by_config[first_with[key]], done)
            else:
                by_config[c.name] = self._run_config(c, done)
                if key is not None:
                    first_with[key] = c.name
            c.remember(by_config[c.name])
        summary = self.summarize(by_config, {c.name: c for c in configs})
        for name, source in same_as.items():
            summary["configs"][name]["same_inputs_as"] = source
        if self.pairwise_judge is not None:
            ref = by_config[self.reference]
            for name, rows in by_config.items():
                if name == self.reference:
                    continue
                twin_source = same_as.get(name)
                twin_of = summary["configs"].get(twin_source or "", {})
                if "pairwise_llm_judge_vs_reference" in twin_of:
                    # The same answers as its source: that verdict holds, the judge is not asked again.
                    verdict = dict(twin_of["pairwise_llm_judge_vs_reference"])
                    summary["configs"][name]["pairwise_llm_judge_vs_reference"] = verdict
                    continue
                if twin_source == self.reference:  # the reference's own answers: a tie on every prompt
                    p = [0.5] * len(rows)
                else:
                    p = self.pairwise_judge.prefer(
                        self.prompts, [r["answer"] for r in rows], [r["answer"] for r in ref]
                    )
                summary["configs"][name]["pairwise_llm_judge_vs_reference"] = stats.win_rate(
                    p, [0.5] * len(p)
                ) | {"win_rate": sum(p) / len(p)}
        report = EvalReport(
            names, list(self.judges), summary, [r for rows in by_config.values() for r in rows]
        )
        if self.out_dir:
            self.write(report, by_config)
        return report

    def summarize(
        self, by_config: dict[str, list[dict]], configs: dict[str, Configuration]
    ) -> dict[str, Any]:
        ref = by_config[self.reference]
        out: dict[str, Any] = {
            "n_prompts": len(self.prompts),
            "judges": list(self.judges),
            "selection_judge": self.selection_judge,
            "reference": self.reference,
            "focus": self.focus,
            "configs": {},
            "head_to_head": {},
            "equal_calls": [],
            "gap_closed": {},
            "judge_trained_on_prompts": dict(self.judge_trained_on_prompts),
        }
        for name, rows in by_config.items():
            cfg = configs[name]
            entry: dict[str, Any] = {"description": cfg.description, "k": cfg.k}
            # Best-of-k asks k times; a gated retry asks again only where its gate scored the answer poorly.
            entry["target_calls_per_prompt"] = sum(r["k"] for r in rows) / max(len(rows), 1)
            rewrites = [r["rewrite"] for r in rows if r["rewrite"] and not r["fallback_reason"]]
            entry["fallback_rate"] = sum(bool(r["fallback_reason"]) for r in rows) / max(len(rows), 1)
            entry["mean_rewrite_chars"] = sum(map(len, rewrites)) / len(rewrites) if rewrites else 0.0
            words = [answer_words(r["answer"]) for r in rows]
            entry["mean_answer_words"] = sum(words) / max(len(words), 1)
            if isinstance(cfg, (FixedTemplate, WithPrompter, BestOfK)):
                entry["outputs"] = prompter_outputs(rows)
            if isinstance(cfg, RefineAndKeepBetter):
                # The guidance written where it refined ('' where the prompter kept x), whichever answer was kept.
                entry["outputs"] = stats.most_common_share(
                    [
                        "" if r["refinement"]["fallback_reason"] else r["refinement"]["guidance"] or ""
                        for r in rows
                        if r.get("refinement")
                    ]
                )
                entry["refinements"] = refinement_kinds(rows)
            for judge in self.judges:
                entry[judge] = stats.summary([r["rewards"][judge] for r in rows])
                if name != self.reference:
                    w = paired_win(rows, ref, judge)
                    entry[judge]["vs_reference"] = {k: v for k, v in w.items() if k != "length_controlled"}
                    ref_vals = [r["rewards"][judge] for r in ref]
                    vals = [r["rewards"][judge] for r in rows]
                    entry[judge]["variance_ratio_vs_reference"] = stats.variance_ratio(vals, ref_vals)
                    # Judges favour longer answers: the win rate at equal length shows what is left.
                    entry[judge]["vs_reference_length_controlled"] = w["length_controlled"]
            if isinstance(cfg, (WithRetryGate, BestOfN, RefineAndKeepBetter)) or cfg.k > 1:
                entry["selection"] = self._selection(rows, ref)
            out["configs"][name] = entry
        if self.focus in by_config:
            focus_rows = by_config[self.focus]
            for name, rows in by_config.items():
                if name == self.focus:
                    continue
                out["head_to_head"][name] = {}
                for judge in self.judges:
                    d = stats.mean_difference(
                        [r["rewards"][judge] for r in focus_rows], [r["rewards"][judge] for r in rows]
                    )
                    out["head_to_head"][name][judge] = {
                        **paired_win(focus_rows, rows, judge),
                        "mean_diff": d["mean_diff"],
                        "mean_diff_ci": [d["ci_low"], d["ci_high"]],
                    }
        out["equal_calls"] = self._equal_calls(by_config, configs, out["configs"])
        oracle = next((n for n, c in configs.items() if isinstance(c, Oracle)), None)
        if oracle and self.focus in by_config:
            for judge in self.judges:
                m = {n: out["configs"][n][judge]["mean"] for n in (self.reference, self.focus, oracle)}
                out["gap_closed"][judge] = stats.gap_closed(m[self.reference], m[self.focus], m[oracle])
        return out

    def _selection(self, rows: list[dict], ref: list[dict]) -> dict[str, Any]:
        """How the selection judge's choices look to every other judge, on the answers it chose between.

        ``agreement``: on pairs of candidates both tell apart, the share where they prefer the same one;
        ``kept_is_judge_best``: the share of prompts where the kept answer is also the judge's best;
        ``judge_choice_vs_reference``: the win rate against the reference had the judge chosen among the same
        answers (the headroom of the candidates; only when every record holds its candidates).
        """
        selector = self.selection_judge
        chose = [r for r in rows if r.get("candidates")]
        # Records written before candidates were recorded: the per-prompt headroom cannot be computed.
        complete = all(r.get("candidates") for r in rows if r["k"] > 1)
        out: dict[str, Any] = {
            "selector": selector,
            "prompts_chosen_between": len(chose),
            "complete": complete,
        }
        for judge in self.judges:
            if judge == selector:
                continue
            groups = [[(c["rewards"][selector], c["rewards"][judge]) for c in r["candidates"]] for r in chose]
            kept_best = [
                r["candidates"][r["kept"]]["rewards"][judge]
                >= max(c["rewards"][judge] for c in r["candidates"]) - 1e-9
                for r in chose
            ]
            result: dict[str, Any] = {
                "agreement": stats.pairwise_agreement(groups),
                "kept_is_judge_best": sum(kept_best) / len(kept_best) if kept_best else float("nan"),
            }
            if complete:
                best = [
                    max(c["rewards"][judge] for c in r["candidates"])
                    if r.get("candidates")
                    else r["rewards"][judge]
                    for r in rows
                ]
                result["judge_choice_vs_reference"] = stats.win_rate(best, [r["rewards"][judge] for r in ref])
            out[judge] = result
        return out

    def _equal_calls(
        self, by_config: dict[str, list[dict]], configs: dict[str, Configuration], entries: dict[str, Any]
    ) -> list[dict[str, Any]]:
        """Each configuration that asks the target more than once against best-of-n sampling with n its calls per
        prompt rounded up (so the sampling never has fewer calls), when that best-of-n was evaluated."""
        sampling = {c.n: name for name, c in configs.items() if isinstance(c, BestOfN)}
        rows = []
        for name, entry in entries.items():
            calls = entry["target_calls_per_prompt"]
            against = sampling.get(math.ceil(calls - 1e-9))
            if isinstance(configs[name], BestOfN) or calls <= 1 or against is None:
                continue
            row: dict[str, Any] = {
                "config": name,
                "calls": calls,
                "against": against,
                "against_calls": entries[against]["target_calls_per_prompt"],
            }
            for judge in self.judges:
                row[judge] = paired_win(by_config[name], by_config[against], judge)
            rows.append(row)
        return rows

    def write(self, report: EvalReport, by_config: dict[str, list[dict]]) -> None:
        assert self.out_dir is not None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "results.json").write_text(
            json.dumps({"summary": report.summary, "records": report.records}, indent=1, ensure_ascii=False)
        )
        (self.out_dir / "results.md").write_text(report.to_markdown())
        try:
            plot_distributions(by_config, list(self.judges), self.out_dir / "reward_distributions.png")
        except Exception as exc:  # plotting is a convenience; never lose the results over it
            logger.warning("could not draw plots: %s", exc)


def plot_distributions(by_config: dict[str, list[dict]], judges: list[str], path: Path) -> None:
    matplotlib = require("matplotlib", "Plotting evaluation results")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(judges), figsize=(5 * len(judges), 4), squeeze=False)
    names = list(by_config)
    for ax, judge in zip(axes[0], judges, strict=True):
        data = [[r["rewards"][judge] for r in by_config[n]] for n in names]
        ax.boxplot(data, showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
        ax.set_title(f"reward ({judge})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training_curve(metrics_jsonl: str | Path, path: str | Path, stage: str = "rl") -> None:
    matplotlib = require("matplotlib", "Plotting evaluation results")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = [json.loads(line) for line in Path(metrics_jsonl).read_text().splitlines() if line.strip()]
    rows = [r for r in logged if r.get("stage") == stage and "reward" in r]
    if not rows:
        raise ValueError(f"no '{stage}' reward entries in {metrics_jsonl}")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["reward"] for r in rows], label="mean reward")
    val = [r for r in logged if r.get("stage") == stage and "val_reward" in r]
    if val:  # kl-optimum's fixed validation prompts, deployed rewrites; step 0 = the SFT prompter
        ax.plot([r["step"] for r in val], [r["val_reward"] for r in val], marker="o", label="validation")
        ax.legend(loc="lower right")
    if "kl" in rows[0]:
        ax2 = ax.twinx()
        ax2.plot(
            [r["step"] for r in rows],
            [r.get("kl", 0) for r in rows],
            color="tab:orange",
            alpha=0.6,
            label="KL",
        )
        ax2.set_ylabel("KL to SFT prompter")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.set_title("RL stage")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
