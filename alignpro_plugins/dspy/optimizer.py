"""``AlignProOptimizer``: a DSPy teleprompter that trains a prompter for a program with the Align-Pro RL stage.

The RL stage knows prompts x, rewrites x', the frozen target's answer y = target(x') and a reward r(x, y).
Mapped onto DSPy:

* x is the value of ONE input field of a training example (the field being rewritten); the example's other
  input fields travel with it as the context of its :class:`~alignpro_plugins.targets.TargetRequest`;
* the frozen target runs the student program on those inputs with the field set to x'; its answer is the
  prediction's fields as JSON (what the answer cache stores), carrying the live ``Prediction`` while in memory;
* the reward is the DSPy metric on (the example of x, that prediction).
"""

from __future__ import annotations

import contextvars
import dataclasses
import difflib
import hashlib
import inspect
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dspy
from dspy.teleprompt import Teleprompter

from alignpro_plugins.dspy.module import AlignProModule, check_fields, default_fields
from alignpro_plugins.manifest import MODES
from alignpro_plugins.specs import classify_prompter_spec
from alignpro_plugins.targets import FrozenTarget, TargetRequest

logger = logging.getLogger(__name__)


def _takes_trace(metric: Callable[..., Any]) -> bool:
    try:
        inspect.signature(metric).bind(None, None, None)
        return True
    except TypeError:
        return False
    except ValueError:  # builtins without a signature
        return False


def metric_score(metric: Callable[..., Any], example: Any, prediction: Any) -> float:
    """A DSPy metric's value as a float: bools become 0/1, ``Prediction(score=...)`` its score, None and NaN 0."""
    value = metric(example, prediction, None) if _takes_trace(metric) else metric(example, prediction)
    if value is None:
        return 0.0
    score = float(value)
    return 0.0 if math.isnan(score) else score


def _prediction_fields(pred: Any) -> dict[str, Any]:
    if isinstance(pred, dspy.Example):
        return dict(pred.items())
    if isinstance(pred, dict):
        return dict(pred)
    return {"output": pred}


def _example_inputs(example: dspy.Example, names: Sequence[str]) -> dict[str, Any]:
    """The program's inputs from an example: its declared inputs, else the signature's input fields it has."""
    keys = getattr(example, "_input_keys", None)
    if keys:
        return {k: example[k] for k in keys}
    return {k: example[k] for k in names if k in example}


class _ProgramAnswer(str):
    """A program's answer: the prediction's fields as JSON text, with the ``Prediction`` object itself attached.

    The answer cache persists the text; an answer read back from it (a plain string) is rebuilt from the JSON.
    """

    prediction: Any

    def __new__(cls, prediction: Any) -> _ProgramAnswer:
        answer = super().__new__(
            cls, json.dumps(_prediction_fields(prediction), ensure_ascii=False, default=str)
        )
        answer.prediction = prediction
        return answer


def _answer_prediction(answer: str) -> Any | None:
    """The prediction behind a program target's answer; None for one that is not (e.g. a failed call's "")."""
    if isinstance(answer, _ProgramAnswer):
        return answer.prediction
    try:
        fields = json.loads(answer)
    except (TypeError, ValueError):
        return None
    return dspy.Prediction(**fields) if isinstance(fields, dict) else None


class _ProgramBridge:
    """The student program as the frozen target and the metric as the reward, keyed by the rewritten field."""

    def __init__(
        self,
        program: dspy.Module,
        field: str,
        trainset: Sequence[dspy.Example],
        metric: Callable[..., Any],
        input_names: Sequence[str],
    ) -> None:
        self.program = program
        self.field = field
        self.metric = metric
        self.input_names = list(input_names)
        self.examples: dict[str, dspy.Example] = {}
        duplicates = 0
        for i, ex in enumerate(trainset):
            text = ex.get(field) if isinstance(ex, dspy.Example) else None
            if not isinstance(text, str):
                raise ValueError(f"trainset[{i}] has no str field {field!r} to rewrite: {ex!r}")
            if text in self.examples:
                duplicates += 1
                continue
            self.examples[text] = ex
        if duplicates:
            # The RL stage sees only the field's text: examples that share it are one training prompt.
            logger.warning(
                "%d trainset examples repeat the text of field %r; the first one is used", duplicates, field
            )

    def prompts(self) -> list[TargetRequest]:
        """The training prompts: each example's field, with the example's inputs as the request context."""
        return [
            TargetRequest(x, context={"inputs": _example_inputs(ex, self.input_names)})
            for x, ex in self.examples.items()
        ]

    def answer(self, request: TargetRequest) -> _ProgramAnswer:
        """The frozen target: run the program on the request's inputs with the field set to its prompt."""
        if request.context is None or "inputs" not in request.context:
            raise ValueError(
                "the program target answers requests whose context holds the example's inputs "
                f"(context={{'inputs': {{...}}}}); got {request.context!r} for {request.prompt[:80]!r}"
            )
        pred = self.program(**{**request.context["inputs"], self.field: request.prompt})
        return _ProgramAnswer(pred)

    def reward(self, prompts: list[str], answers: list[str]) -> list[float]:
        """The RL reward: the DSPy metric on (example for x, the target's prediction); 0 when unusable."""
        scores = []
        for x, answer in zip(prompts, answers, strict=True):
            ex = self.examples.get(x)
            pred = _answer_prediction(answer) if answer else None
            if ex is None or pred is None:
                scores.append(0.0)
                continue
            try:
                scores.append(metric_score(self.metric, ex, pred))
            except Exception as exc:  # a metric that fails on odd output must not stop training
                logger.warning("metric failed (%s: %s); reward 0", type(exc).__name__, exc)
                scores.append(0.0)
        return scores

    def identity(self) -> str:
        """Names the program, its LM and the trainset: the target answer cache is keyed by it."""
        lm = dspy.settings.lm
        try:
            lm_state = lm.dump_state() if lm is not None else None
        except Exception:
            lm_state = repr(lm)
        blob = json.dumps(
            [self.program.dump_state(), lm_state, self.field, [e.toDict() for e in self.examples.values()]],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


class _ProgramTarget(FrozenTarget):
    """FrozenTarget over the bridge; optional threads, each in a copy of the caller's DSPy context."""

    def __init__(self, bridge: _ProgramBridge, num_threads: int = 1) -> None:
        super().__init__()
        self.bridge = bridge
        self.num_threads = max(1, num_threads)
        self._identity = f"dspy-program:{bridge.identity()}"

    @property
    def identity(self) -> str:
        return self._identity

    def _one(self, request: TargetRequest) -> str:
        try:
            return self.bridge.answer(request)
        except Exception as exc:  # counted and logged; reward 0
            return self._failed(exc, request.prompt)

    def _answer(self, requests: list[TargetRequest]) -> list[str]:
        if self.num_threads == 1 or len(requests) < 2:
            return [self._one(r) for r in requests]
        with ThreadPoolExecutor(self.num_threads) as pool:
            # dspy.context() overrides live in a ContextVar: each task runs in its own copy of ours.
            futures = [pool.submit(contextvars.copy_context().run, self._one, r) for r in requests]
            return [f.result() for f in futures]

    def _generate(self, prompts: list[str]) -> list[str]:
        return self._answer([TargetRequest(p) for p in prompts])


def evaluate(program: dspy.Module, dataset: Sequence[dspy.Example], metric: Callable[..., Any]) -> float:
    """Mean metric over ``dataset`` (sequential; a failing example scores 0 and is logged)."""
    scores = []
    names = _signature_inputs(program)
    for ex in dataset:
        try:
            scores.append(metric_score(metric, ex, program(**_example_inputs(ex, names))))
        except Exception as exc:
            logger.warning("evaluation of one example failed (%s: %s); scored 0", type(exc).__name__, exc)
            scores.append(0.0)
    return sum(scores) / len(scores) if scores else float("nan")


def _signature_inputs(program: dspy.Module) -> list[str]:
    if isinstance(program, AlignProModule):
        program = program.program  # its predictors may be hidden if the wrapped program is marked compiled
    predictors = program.named_predictors()
    return list(predictors[0][1].signature.input_fields) if predictors else []


class AlignProOptimizer(Teleprompter):
    """Train a prompter for a DSPy program: Align-Pro RL with the program as the frozen target and the DSPy
    metric as the reward. ``compile`` returns a NEW program (the student deep-copied inside an
    :class:`AlignProModule` with the trained prompter) and leaves the student unchanged.

    Args:
        metric: ``metric(example, prediction[, trace]) -> bool | float`` (may also be given to ``compile``).
        prompter: base model name (a fresh LoRA is trained), a prompter artifact folder (e.g. an SFT prompter:
            training continues from it with the KL anchored there), or a ``Prompter`` (trained in place).
        field: the input field to rewrite; default the first ``str`` input field of the first predictor.
        mode: "augment" (append guidance to the field) or "rewrite"; default the prompter's own mode.
        output_dir: where the trained prompter artifact, metrics and ``dspy_compile.json`` go (default: a
            new temporary folder).
        rl_config: keyword arguments for :class:`trainers.rl_config.AlignProRLConfig` (GRPO: ``max_steps``,
            ``per_device_train_batch_size``, ``num_generations``, ``max_completion_length``, ``beta``, ...), or,
            with ``algorithm="kl-optimum"``, for :class:`trainers.kl_optimum_config.KLOptimumConfig`
            (``rounds``, ...); checked when ``compile`` starts, before any program call.
        num_threads: program calls in parallel during training (useful with a remote LM).

    After ``compile``: :attr:`valset_score_before`, :attr:`valset_score_after` and :attr:`results`.
    """

    def __init__(
        self,
        metric: Callable[..., Any] | None = None,
        *,
        prompter: Any = "smollm2-135m-instruct",
        field: str | None = None,
        mode: str | None = None,
        output_dir: str | None = None,
        rl_config: dict[str, Any] | None = None,
        num_threads: int = 1,
    ) -> None:
        super().__init__()
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None (the prompter's own mode), got {mode!r}")
        if rl_config is not None and not isinstance(rl_config, dict):
            raise TypeError(
                f"rl_config is a dict of RL config fields (AlignProRLConfig's), got {type(rl_config).__name__}"
            )
        if isinstance(prompter, (str, os.PathLike)):
            classify_prompter_spec(prompter)  # a local-looking path without alignpro.json fails here
        self.metric = metric
        self.prompter = prompter
        self.field = field
        self.mode = mode
        self.output_dir = output_dir
        self.rl_config = dict(rl_config or {})
        self.num_threads = num_threads
        self.valset_score_before: float | None = None
        self.valset_score_after: float | None = None
        self.results: dict[str, Any] = {}
        self._target: _ProgramTarget | None = None

    def _prompter_source(self) -> Any:
        if isinstance(self.prompter, (str, os.PathLike)):
            if classify_prompter_spec(self.prompter) == "artifact":
                return str(self.prompter)
            from alignpro_plugins.prompter import Prompter

            # similarity=None: the trainers score rewrites without the embedding guard (as the RL stage does).
            return Prompter.from_base(str(self.prompter), mode=self.mode or "augment", similarity=None)
        return self.prompter

    def _rl_config_class(self) -> type:
        """The RL stage's config: GRPO's, or kl-optimum's when ``rl_config`` says ``algorithm="kl-optimum"``."""
        if self.rl_config.get("algorithm") == "kl-optimum":
            from trainers.kl_optimum_config import KLOptimumConfig

            return KLOptimumConfig
        from trainers.rl_config import AlignProRLConfig

        return AlignProRLConfig

    def _check_rl_config(self) -> None:
        """Unknown rl_config keys fail before any program call (not after the whole valset evaluation)."""
        config_class = self._rl_config_class()
        known = {f.name for f in dataclasses.fields(config_class) if f.init}
        unknown = sorted(set(self.rl_config) - known)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=1)
                hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
            raise ValueError(
                f"rl_config has unknown keys: {', '.join(hints)}. It takes {config_class.__name__} fields, e.g. "
                "max_steps, per_device_train_batch_size, num_generations, max_completion_length, beta, "
                "learning_rate (the full list: `alignpro rl --help`, or `alignpro rl --algorithm kl-optimum "
                "--help`)"
            )

    def _rl_config(self, output_dir: Path) -> Any:
        """The RL stage's config; built when compile starts so bad values fail before any program call."""
        kwargs = {**self.rl_config, "output_dir": str(output_dir)}
        if self.mode:
            kwargs["mode"] = self.mode
        return self._rl_config_class()(**kwargs)

    def _train(self, bridge: _ProgramBridge, config: Any) -> Any:
        """One Align-Pro RL run; returns the trained Prompter (saved in ``config.output_dir``)."""
        from trainers.rl_trainer import train_rl

        self._target = _ProgramTarget(bridge, self.num_threads)
        return train_rl(
            config,
            prompter=self._prompter_source(),
            prompts=bridge.prompts(),
            target=self._target,
            reward=bridge.reward,
        )

    def compile(
        self,
        student: dspy.Module,
        *,
        trainset: Sequence[dspy.Example],
        teacher: dspy.Module | None = None,
        valset: Sequence[dspy.Example] | None = None,
        metric: Callable[..., Any] | None = None,
        **kwargs: Any,
    ) -> AlignProModule:
        """Train a prompter for ``student`` on ``trainset``; returns a new :class:`AlignProModule`.

        Other keyword arguments that DSPy optimizers take (``Teleprompter.compile(**kwargs)``) are ignored
        with a warning.
        """
        if kwargs:
            logger.warning("AlignProOptimizer.compile ignores %s", ", ".join(f"{k}=" for k in sorted(kwargs)))
        metric = metric or self.metric
        if metric is None:
            raise ValueError(
                "AlignProOptimizer needs a metric: AlignProOptimizer(metric=...) or compile(..., metric=...)"
            )
        if not trainset:
            raise ValueError("AlignProOptimizer.compile needs a non-empty trainset")
        if teacher is not None:
            logger.warning("AlignProOptimizer ignores teacher=: the student itself is the frozen target")
        start = time.perf_counter()
        valset = list(valset or [])
        field = self.field or default_fields(student)[0]
        # Everything that can be wrong with the arguments fails here, before the valset evaluation.
        check_fields(student, [field], inferred=not self.field)
        self._check_rl_config()
        # Deep copies everywhere: training and evaluation must not touch the student (nor its history).
        bridge = _ProgramBridge(student.deepcopy(), field, trainset, metric, _signature_inputs(student))
        output_dir = Path(self.output_dir or tempfile.mkdtemp(prefix="alignpro-dspy-"))
        output_dir.mkdir(parents=True, exist_ok=True)
        rl_config = self._rl_config(output_dir)  # its own value checks (algorithm, beta, ...) run here

        before = evaluate(student.deepcopy(), valset, metric) if valset else None
        if valset:
            logger.info("AlignProOptimizer: valset metric before = %.4f (%d examples)", before, len(valset))
        prompter = self._train(bridge, rl_config)
        program = AlignProModule(student.deepcopy(), prompter, fields=[field], prompter_path=output_dir)
        program._compiled = True
        after = evaluate(program.deepcopy(), valset, metric) if valset else None

        self.valset_score_before, self.valset_score_after = before, after
        stats = self._target.stats if self._target is not None else None
        stages = prompter.manifest.provenance.get("stages") or [{}]
        self.results = {
            "field": field,
            "train_prompts": len(bridge.examples),
            "valset_size": len(valset),
            "metric_before": before,
            "metric_after": after,
            "output_dir": str(output_dir.resolve()),
            "prompter_manifest_sha256": program.prompter_sha256(),
            "rl": stages[-1],
            "target_calls": stats.calls if stats else None,
            "target_failures": stats.failures if stats else None,
            "seconds": round(time.perf_counter() - start, 2),
        }
        (output_dir / "dspy_compile.json").write_text(json.dumps(self.results, indent=2, default=str))
        if valset:
            logger.info(
                "AlignProOptimizer: valset metric %.4f -> %.4f (%d examples); prompter saved in %s",
                before,
                after,
                len(valset),
                output_dir,
            )
        return program
