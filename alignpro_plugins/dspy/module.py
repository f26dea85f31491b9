"""``AlignProModule``: run any DSPy program on prompter-rewritten inputs.

The wrapped program is untouched; only the values of the chosen input fields change before it runs. Every call
records, per field, the original text, what the program received and why the prompter's output was not used
(if it was not). State is saved as JSON only: the program's own state plus the prompter artifact's path and
the sha256 of its ``alignpro.json``, checked again when the state is loaded.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import dspy

from alignpro_plugins.artifact import artifact_folder
from alignpro_plugins.gate import GateDecision, GateResult, RetryGate
from alignpro_plugins.manifest import MANIFEST_NAME
from alignpro_plugins.specs import classify_prompter_spec

STATE_KEY = "alignpro"
STATE_FORMAT = 1


class PrompterMismatchError(ValueError):
    """The prompter artifact differs from the one a saved program was built with."""


@dataclass(frozen=True)
class RewriteRecord:
    """What happened to one input field in one call."""

    field: str
    original: str
    rewritten: str  # what the program received (the original when the prompter's output was rejected)
    fallback_reason: str | None = None
    generated: str | None = None

    @property
    def changed(self) -> bool:
        return self.fallback_reason is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def manifest_sha256(folder: str | os.PathLike[str]) -> str:
    """``sha256:<hex>`` of a prompter artifact's ``alignpro.json`` bytes."""
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        raise FileNotFoundError(f"{folder} is not a prompter artifact: {MANIFEST_NAME} is missing")
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest_text_sha256(manifest: Any) -> str:
    # Manifest.save writes exactly to_json(), so this equals the file hash of a freshly saved artifact.
    return "sha256:" + hashlib.sha256(manifest.to_json().encode()).hexdigest()


def default_fields(program: dspy.Module) -> list[str]:
    """The ``str`` input fields of the program's first predictor's signature."""
    predictors = program.named_predictors()
    if not predictors:
        raise ValueError(
            f"{type(program).__name__} has no dspy.Predict inside, so the fields to rewrite cannot be "
            "inferred: pass fields=[...]"
        )
    signature = predictors[0][1].signature
    fields = [name for name, info in signature.input_fields.items() if info.annotation is str]
    if not fields:
        raise ValueError(
            f"the first predictor's signature {signature.signature!r} has no str input field to rewrite: "
            "pass fields=[...]"
        )
    return fields


def input_names(program: dspy.Module) -> list[str] | None:
    """The input names a call of ``program`` can take, or None when they cannot be known.

    A custom ``forward(question, ...)`` takes its parameters; DSPy's own modules (``Predict``,
    ``ChainOfThought``, ...) take their predictors' signature input fields. A custom ``forward(**kwargs)``
    may take anything.
    """
    params = list(inspect.signature(program.forward).parameters.values())
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    if not takes_any:
        return named
    if not type(program).__module__.startswith("dspy."):
        return None
    fields = {name: None for _, p in program.named_predictors() for name in p.signature.input_fields}
    return [*named, *fields] if fields else None


def check_fields(program: dspy.Module, fields: list[str], *, inferred: bool = False) -> None:
    """Raise when a field to rewrite is not an input of the program (it would silently never be rewritten)."""
    for name in fields:
        if not isinstance(name, str):
            raise TypeError(f"fields must be input field names (str), got {name!r}")
    valid = input_names(program)
    if valid is None:
        return
    unknown = [f for f in fields if f not in valid]
    if unknown:
        origin = "the first predictor's str inputs " if inferred else ""
        raise ValueError(
            f"fields {origin}{unknown} are not inputs of {type(program).__name__}, so they would never be "
            f"rewritten; its inputs are {valid}: pass fields=[...] with some of these"
        )


def get_rewrites(prediction: Any) -> list[RewriteRecord]:
    """The rewrite records of the call that returned ``prediction`` (``[]`` if it did not come from here)."""
    return list(getattr(prediction, "_alignpro_rewrites", None) or [])


def get_gate(prediction: Any) -> dict[str, Any] | None:
    """What the retry gate did in the call that returned ``prediction`` (None: no gate, or nothing to score)."""
    return getattr(prediction, "_alignpro_gate", None)


def default_answer_field(program: dspy.Module) -> str:
    """The output field a retry gate scores: the last ``str`` output of the last predictor, not its reasoning."""
    predictors = program.named_predictors()
    outputs = predictors[-1][1].signature.output_fields if predictors else {}
    names = [n for n, info in outputs.items() if info.annotation is str and n != "reasoning"]
    if not names:
        raise ValueError(
            f"cannot tell which output of {type(program).__name__} the retry gate should score: pass "
            "answer_field=... (the name of a str output field)"
        )
    return names[-1]


def _is_artifact(path: Any) -> bool:
    return isinstance(path, (str, os.PathLike)) and (Path(path) / MANIFEST_NAME).exists()


class AlignProModule(dspy.Module):
    """Wrap a DSPy program so that chosen input fields are rewritten by a prompter before it runs.

    Args:
        program: any ``dspy.Module`` (``Predict``, ``ChainOfThought``, a custom module).
        prompter: a :class:`~alignpro_plugins.prompter.Prompter`, a prompter artifact folder, a base model
            name (an untrained, zero-shot prompter), or ``None`` to load one later with :meth:`load`.
        fields: input field names to rewrite; default: the ``str`` input fields of the first predictor.
        prompter_path: the artifact folder of a ``Prompter`` object (recorded by :meth:`save`).
        mode: prompter mode when ``prompter`` is a base model name ("augment" or "rewrite").
        max_history: how many rewrite records :attr:`rewrite_history` keeps.
        prompter_kwargs: passed to ``Prompter.from_pretrained`` / ``from_base`` when this module loads one.
        retry_gate: a :class:`~alignpro_plugins.gate.RetryGate`. The program runs on the original inputs first;
            only when the gate scores its answer below the threshold does it run again on the rewritten inputs,
            and the higher-scored prediction is returned. The reward scores the answer against the original
            text of the rewritten fields (joined by a blank line when there are several).
        answer_field: the output field the gate scores; default: the last ``str`` output of the last predictor.

    ``get_rewrites(prediction)`` returns the records of one call; :attr:`rewrite_history` the recent ones;
    ``get_gate(prediction)`` what the retry gate did.
    """

    def __init__(
        self,
        program: dspy.Module,
        prompter: Any = None,
        *,
        fields: str | Sequence[str] | None = None,
        prompter_path: str | os.PathLike[str] | None = None,
        mode: str | None = None,
        max_history: int = 1000,
        prompter_kwargs: dict[str, Any] | None = None,
        retry_gate: RetryGate | None = None,
        answer_field: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(program, dspy.Module):
            raise TypeError(f"AlignProModule wraps a dspy.Module, got {type(program).__name__}")
        if retry_gate is not None and not isinstance(retry_gate, RetryGate):
            raise TypeError(
                "retry_gate must be a RetryGate (RetryGate(reward, threshold) or RetryGate.for_budget(...)), got "
                f"{type(retry_gate).__name__}"
            )
        self.program = program
        self.retry_gate = retry_gate
        self.answer_field = answer_field or (default_answer_field(program) if retry_gate else None)
        if fields:
            self.fields = [fields] if isinstance(fields, str) else list(fields)
        else:
            self.fields = default_fields(program)
        check_fields(program, self.fields, inferred=not fields)
        self.prompter_kwargs = dict(prompter_kwargs or {})
        self.max_history = max_history
        self.rewrite_history: deque[RewriteRecord] = deque(maxlen=max_history)
        self.last_rewrites: list[RewriteRecord] = []  # the most recent call's records (one per field)
        self.last_gate: dict[str, Any] | None = None  # what the retry gate did in the most recent call
        self.prompter_path = str(Path(prompter_path).resolve()) if prompter_path else None
        self.prompter = None
        if isinstance(prompter, (str, os.PathLike)):
            from alignpro_plugins.prompter import Prompter

            # A local-looking path without alignpro.json raises here, not as a hub error for a "model name".
            if classify_prompter_spec(prompter) == "artifact":
                self.prompter = Prompter.from_pretrained(prompter, **self.prompter_kwargs)
                # A packaged prompter's name becomes its folder, so a saved program finds it again.
                self.prompter_path = str(artifact_folder(prompter).resolve())
            else:
                self.prompter = Prompter.from_base(
                    str(prompter), mode=mode or "augment", **self.prompter_kwargs
                )
        elif prompter is not None:
            if not callable(getattr(prompter, "rewrite_results", None)):
                raise TypeError("prompter must be a Prompter, an artifact folder or a base model name")
            self.prompter = prompter
        if retry_gate is None and getattr(getattr(self.prompter, "manifest", None), "mode", None) == "refine":
            raise ValueError(
                "a refinement prompter (mode 'refine') needs a retry gate: it writes from the program's first "
                "answer, which only the gate hands it; pass retry_gate=RetryGate.rerank(reward) (keep the better "
                "answer) or retry_gate=RetryGate.always() (keep the refined one)"
            )

    # ------------------------------------------------------------------ calling
    def _inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        if not args:
            return dict(kwargs)
        # Positional arguments of a custom forward(question, ...) are mapped to their names.
        params = inspect.signature(self.program.forward).parameters
        if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params.values()):
            raise TypeError("AlignProModule needs keyword arguments for a program whose forward takes *args")
        bound = inspect.signature(self.program.forward).bind_partial(*args, **kwargs).arguments
        out: dict[str, Any] = {}
        for name, value in bound.items():
            if params[name].kind is inspect.Parameter.VAR_KEYWORD:
                out.update(value)
            else:
                out[name] = value
        return out

    def _require_prompter(self) -> Any:
        if self.prompter is None:
            raise RuntimeError(
                "this AlignProModule has no prompter: pass prompter=... or load a saved state with .load(path)"
            )
        return self.prompter

    def _selected(self, inputs: dict[str, Any]) -> list[str]:
        return [f for f in self.fields if isinstance(inputs.get(f), str)]

    def _apply(self, inputs: dict[str, Any], names: list[str], results: list[Any]) -> list[RewriteRecord]:
        records = []
        for name, res in zip(names, results, strict=True):
            records.append(RewriteRecord(name, res.original, res.text, res.fallback_reason, res.generated))
            inputs[name] = res.text
        return records

    def _finish(self, output: Any, records: list[RewriteRecord]) -> Any:
        self.rewrite_history.extend(records)
        self.last_rewrites = records
        if isinstance(output, dspy.Example):
            # A leading underscore keeps it out of the prediction's fields (and out of metrics and traces).
            output._alignpro_rewrites = records
        return output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        prompter = self._require_prompter()
        inputs = self._inputs(args, kwargs)
        names = self._selected(inputs)
        if self.retry_gate is not None and names:
            return self._gated_forward(prompter, inputs, names)
        results = prompter.rewrite_results([inputs[n] for n in names]) if names else []
        records = self._apply(inputs, names, results)
        return self._finish(self.program(**inputs), records)

    async def aforward(self, *args: Any, **kwargs: Any) -> Any:
        prompter = self._require_prompter()
        inputs = self._inputs(args, kwargs)
        names = self._selected(inputs)
        if self.retry_gate is not None and names:
            return await self._agated_forward(prompter, inputs, names)
        results = await prompter.arewrite_results([inputs[n] for n in names]) if names else []
        records = self._apply(inputs, names, results)
        return self._finish(await self.program.acall(**inputs), records)

    # ------------------------------------------------------------------ retry gate (the flow is RetryGate's)
    def _gated_forward(self, prompter: Any, inputs: dict[str, Any], names: list[str]) -> Any:
        rewrites: list[Any] = []  # the prompter's results, once the gate asks for a retry

        def retries(_: list[int]) -> list[list[dict[str, Any]]]:
            rewrites.extend(prompter.rewrite_results([inputs[n] for n in names]))
            return [self._retry_inputs(inputs, names, rewrites)]

        [result] = cast(RetryGate, self.retry_gate).choose(
            [self._gate_text(inputs, names)],
            [inputs],
            lambda batch: [self.program(**x) for x in batch],
            retries,
            text=self._answer,
        )
        return self._gate_finish(result, inputs, names, rewrites)

    async def _agated_forward(self, prompter: Any, inputs: dict[str, Any], names: list[str]) -> Any:
        rewrites: list[Any] = []

        async def ask(batch: list[dict[str, Any]]) -> list[Any]:
            return [await self.program.acall(**x) for x in batch]

        async def retries(_: list[int]) -> list[list[dict[str, Any]]]:
            rewrites.extend(await prompter.arewrite_results([inputs[n] for n in names]))
            return [self._retry_inputs(inputs, names, rewrites)]

        [result] = await cast(RetryGate, self.retry_gate).achoose(
            [self._gate_text(inputs, names)], [inputs], ask, retries, text=self._answer
        )
        return self._gate_finish(result, inputs, names, rewrites)

    @staticmethod
    def _retry_inputs(inputs: dict[str, Any], names: list[str], rewrites: list[Any]) -> list[dict[str, Any]]:
        """The rewritten inputs, or none when the prompter kept every field (nothing new to ask)."""
        if all(r.fallback_reason is not None for r in rewrites):
            return []
        return [{**inputs, **{n: r.text for n, r in zip(names, rewrites, strict=True)}}]

    def _gate_text(self, inputs: dict[str, Any], names: list[str]) -> str:
        return "\n\n".join(inputs[n] for n in names)

    def _answer(self, prediction: Any) -> str | None:
        value = getattr(prediction, self.answer_field, None) if self.answer_field else None
        return value if isinstance(value, str) else None

    def _gate_records(
        self, result: GateResult, inputs: dict[str, Any], names: list[str], rewrites: list[Any]
    ) -> list[RewriteRecord]:
        """Per field: what the returned prediction was run on, and why that is not the rewrite (if it is not)."""
        decision = result.decision
        if not rewrites:  # the gate did not ask for a retry
            return self._kept_original(inputs, names, decision)
        if result.kept:
            return [
                RewriteRecord(n, r.original, r.text, r.fallback_reason, r.generated)
                for n, r in zip(names, rewrites, strict=True)
            ]
        if len(result.candidates) == 1:  # the prompter kept x: no second call
            return self._unused(names, rewrites)
        assert decision is not None
        why = (
            f"retry gate: the answer to the original input scored higher ({decision.first_score:+.3f} vs "
            f"{decision.retry_score:+.3f})"
            if decision.retry_score is not None
            else f"retry gate: the retry's {self.answer_field!r} is not text, so the first answer was kept"
        )
        return self._unused(names, rewrites, why)

    def _kept_original(
        self, inputs: dict[str, Any], names: list[str], decision: GateDecision | None
    ) -> list[RewriteRecord]:
        why = (
            f"retry gate: the answer to the original input scored {decision.first_score:+.3f}, not below "
            f"{decision.threshold:+.3f}"
            if decision is not None
            else f"retry gate: the program's {self.answer_field!r} is not text, so it could not be scored"
        )
        return [RewriteRecord(n, inputs[n], inputs[n], why) for n in names]

    def _unused(self, names: list[str], results: list[Any], why: str | None = None) -> list[RewriteRecord]:
        """Records for a call whose returned prediction came from the original inputs."""
        return [
            RewriteRecord(n, r.original, r.original, why or r.fallback_reason or "retry gate", r.generated)
            for n, r in zip(names, results, strict=True)
        ]

    def _gate_finish(
        self, result: GateResult, inputs: dict[str, Any], names: list[str], rewrites: list[Any]
    ) -> Any:
        output = result.answer
        self.last_gate = result.decision.as_dict() if result.decision is not None else None
        if isinstance(output, dspy.Example):
            output._alignpro_gate = self.last_gate
        return self._finish(output, self._gate_records(result, inputs, names, rewrites))

    # ------------------------------------------------------------------ copying
    def __deepcopy__(self, memo: dict[int, Any]) -> AlignProModule:
        # DSPy deep-copies programs freely (evaluation, optimizers): copy the program, share the prompter
        # (its weights are read-only at inference), start an empty rewrite history.
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key in ("prompter", "retry_gate"):  # read-only models: share, never copy their weights
                new.__dict__[key] = value
            elif key == "rewrite_history":
                new.__dict__[key] = deque(maxlen=self.max_history)
            elif key == "last_rewrites":
                new.__dict__[key] = []
            elif key == "last_gate":
                new.__dict__[key] = None
            else:
                new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    # ------------------------------------------------------------------ state
    def prompter_sha256(self) -> str:
        """Hash identifying the current prompter: its artifact's alignpro.json, else its in-memory manifest."""
        prompter = self._require_prompter()
        if self.prompter_path and (Path(self.prompter_path) / MANIFEST_NAME).exists():
            return manifest_sha256(self.prompter_path)
        return _manifest_text_sha256(prompter.manifest)

    def dump_state(self, json_mode: bool = True) -> dict[str, Any]:
        prompter = self._require_prompter()
        manifest = prompter.manifest
        return {
            # The program's own state, not named_parameters(): a pre-compiled program would be skipped there.
            "program": self.program.dump_state(json_mode=json_mode),
            STATE_KEY: {
                "format": STATE_FORMAT,
                "prompter_path": self.prompter_path,
                "manifest_sha256": self.prompter_sha256(),
                "fields": list(self.fields),
                "base_model": manifest.base_model,
                "mode": manifest.mode,
                **({"retry_gate": self._gate_state()} if self.retry_gate is not None else {}),
            },
        }

    def _gate_state(self) -> dict[str, Any]:
        gate = self.retry_gate
        assert gate is not None
        path = getattr(
            gate.reward, "path", None
        )  # a reward-model folder can be loaded again; a callable cannot
        return {
            # A rerank gate's threshold is infinite: saved as "inf" (JSON has no infinity), read back by float().
            "threshold": gate.threshold if math.isfinite(gate.threshold) else str(gate.threshold),
            "reward": gate.reward.identity if gate.reward is not None else None,  # None: RetryGate.always()
            "reward_path": str(Path(path).resolve()) if path and Path(path).is_dir() else None,
            "answer_field": self.answer_field,
        }

    def _restore_gate(self, saved: dict[str, Any] | None) -> None:
        """Rebuild a saved retry gate, unless this module was given one (the caller's gate wins)."""
        if not saved or self.retry_gate is not None:
            if saved and self.answer_field is None:
                self.answer_field = saved.get("answer_field")
            return
        path = saved.get("reward_path")
        if saved.get("reward") is None and float(saved["threshold"]) == math.inf:
            self.retry_gate = RetryGate.always()  # no reward model to load
        elif not path or not Path(path).is_dir():
            raise FileNotFoundError(
                f"this program was saved with a retry gate (reward {saved.get('reward')!r}, threshold "
                f"{saved.get('threshold')}) whose reward model cannot be loaded from here "
                f"({path or 'it was not a reward-model folder'}): pass retry_gate=RetryGate(reward, threshold) "
                "when you build the AlignProModule, then load"
            )
        else:
            self.retry_gate = RetryGate(path, float(saved["threshold"]))
        self.answer_field = saved.get("answer_field") or default_answer_field(self.program)

    def _saved_prompter(self, info: dict[str, Any], base_dir: Path | None) -> tuple[Any, str | None]:
        """The prompter a saved state names, after checking its alignpro.json hash (no state is changed)."""
        expected = info.get("manifest_sha256")
        if not expected:
            raise ValueError(f"the saved state's {STATE_KEY!r} section has no manifest_sha256")
        candidates = [info.get("prompter_path")]
        if base_dir is not None and info.get("prompter_relpath"):
            candidates.append(str(base_dir / info["prompter_relpath"]))
        existing = [p for p in dict.fromkeys(candidates) if p and _is_artifact(p)]
        if not existing:
            if self.prompter is not None and self.prompter_sha256() == expected:
                return self.prompter, self.prompter_path
            where = " or ".join(str(c) for c in candidates if c) or "(no path was saved)"
            raise FileNotFoundError(
                f"the prompter artifact this program was saved with is missing: looked in {where}. Restore the "
                "folder, or build AlignProModule(program, prompter=...) with the same prompter and load again."
            )
        # Prefer the location whose manifest matches (the absolute path may now hold another artifact).
        path = next((p for p in existing if manifest_sha256(p) == expected), None)
        if path is None:
            actual = manifest_sha256(existing[0])
            raise PrompterMismatchError(
                f"the prompter artifact at {existing[0]} changed since this program was saved: its "
                f"{MANIFEST_NAME} has {actual}, the saved state expects {expected}. Restore that artifact, or "
                "save the program again with the prompter you want."
            )
        path = str(Path(path).resolve())
        if self.prompter is not None:
            current = self.prompter_sha256()
            if current != expected:
                raise PrompterMismatchError(
                    f"this module's prompter ({current}) is not the one the state was saved with ({expected}, "
                    f"at {path}). Build AlignProModule(program) without a prompter to load the saved one."
                )
            return self.prompter, self.prompter_path or path
        from alignpro_plugins.prompter import Prompter

        return Prompter.from_pretrained(path, **self.prompter_kwargs), path

    def load_state(
        self, state: dict[str, Any], *, allow_unsafe_lm_state: bool = False, base_dir: Path | None = None
    ) -> AlignProModule:
        info = state.get(STATE_KEY)
        if not isinstance(info, dict) or "program" not in state:
            raise ValueError(
                f"not an AlignProModule state (no {STATE_KEY!r} section): load a plain program's state into the "
                "program itself, then wrap it"
            )
        if info.get("format", STATE_FORMAT) > STATE_FORMAT:
            raise ValueError(f"state format {info['format']} is newer than this alignpro-plugins reads")
        prompter, path = self._saved_prompter(info, base_dir)
        self._restore_gate(info.get("retry_gate"))
        self.program.load_state(state["program"], allow_unsafe_lm_state=allow_unsafe_lm_state)
        self.prompter, self.prompter_path = prompter, path
        self.fields = list(info.get("fields") or self.fields)
        return self

    def save(
        self, path: str | os.PathLike[str], save_program: bool = False, modules_to_serialize: Any = None
    ):
        """Save the state as JSON. A prompter without an artifact folder is saved next to it first.

        Never pickles: ``.pkl`` paths and ``save_program=True`` are refused.
        """
        path = Path(path)
        if save_program or path.suffix != ".json":
            raise ValueError(
                "AlignProModule saves its state as JSON only (never pickle): use a path ending in .json"
            )
        prompter = self._require_prompter()
        if self.prompter_path is None:
            folder = path.with_name(path.stem + ".prompter")
            prompter.save_pretrained(folder)
            self.prompter_path = str(folder.resolve())
        state = self.dump_state()
        # A relative path too, so a folder holding both the state and the artifact can be moved.
        state[STATE_KEY]["prompter_relpath"] = os.path.relpath(self.prompter_path, path.parent.resolve())
        from dspy.utils.saving import get_dependency_versions

        state["metadata"] = {"dependency_versions": get_dependency_versions()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=2, ensure_ascii=False, default=str))
        os.replace(tmp, path)
        return path

    def load(
        self, path: str | os.PathLike[str], allow_pickle: bool = False, allow_unsafe_lm_state: bool = False
    ):
        """Load a state written by :meth:`save`; checks the prompter artifact's hash. Never unpickles."""
        path = Path(path)
        if path.suffix != ".json":
            raise ValueError("AlignProModule loads JSON state only (it never unpickles): pass a .json path")
        state = json.loads(path.read_text())
        state.pop("metadata", None)
        return self.load_state(
            state, allow_unsafe_lm_state=allow_unsafe_lm_state, base_dir=path.parent.resolve()
        )

    def __repr__(self) -> str:
        gate = f", retry_gate={self.retry_gate!r}" if self.retry_gate is not None else ""
        return f"AlignProModule(fields={self.fields}, prompter={self.prompter!r}{gate}, program={self.program!r})"
