"""The prompter runtime: a small LM (+ LoRA adapter) that rewrites a user prompt for a frozen target LLM.

``Prompter`` owns the query format, the intent guard and the artifact format; generation and batching are
its :class:`~alignpro_plugins.engine.GenerationEngine`'s. The LangChain and DSPy adapters, the trainers and the
evaluation harness all go through it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alignpro_plugins import guard
from alignpro_plugins.artifact import BaseModelMismatchError as BaseModelMismatchError  # re-exported
from alignpro_plugins.artifact import (
    artifact_folder,
    base_to_load,
    check_before_loading,
    holds_adapter,
    load_adapter,
    save_adapter,
    verify_base_model,
)
from alignpro_plugins.chat_template import checked_chat_template, query_template, save_tokenizer
from alignpro_plugins.engine import (
    Generation,
    GenerationEngine,
    GenerationSettings,
    folder_weights_hash,
    load_causal_lm,
    select_device,
    select_dtype,
)
from alignpro_plugins.manifest import (
    FORMAT_VERSION,
    MODES,
    Manifest,
    appends_guidance,
    available_modes,
    check_generation_kwargs,
    fill_refine_template,
    model_weights_hash,
    portable_base_name,
    weights_hash,
)
from alignpro_plugins.refining import first_answer

if TYPE_CHECKING:  # only in annotations: a remote prompter runs without torch
    import torch

logger = logging.getLogger(__name__)

SimilarityFn = Callable[[Sequence[str], Sequence[str]], list[float]]

#: What the meta-prompt shows after a first answer it cut to the manifest's ``refine_answer_tokens``.
CLIPPED_MARK = " [...]"
NEEDS_FIRST_ANSWER = (
    "this is a refinement prompter (mode 'refine'): it writes the target's second input from the prompt AND "
    "the frozen model's first answer to it, so it needs that answer. Call refine(prompt, first_answer) or "
    "refine_results(prompts, first_answers), or deploy it behind a RetryGate (AlignedChatModel(retry_gate=...), "
    "AlignProModule(retry_gate=...), alignpro serve with a gate reward), which hands it the first answer"
)


@dataclass(frozen=True)
class RewriteResult:
    """What the prompter did with one prompt.

    ``text`` is what the frozen target should receive: the rewrite, the prompt plus guidance (augment mode),
    or the untouched original when ``fallback_reason`` says why the prompter's output was not used.
    """

    original: str
    text: str
    mode: str
    generated: str | None = None
    fallback_reason: str | None = None

    @property
    def rewritten(self) -> bool:
        return self.fallback_reason is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compose(original: str, generated: str, mode: str) -> str:
    """The target's input for a given prompter output.

    Augment (and refine) keep the prompt byte for byte (trailing whitespace and control characters included) and
    add the guidance after a blank line; a prompt that already ends in line breaks gets only the missing ones.
    """
    if not appends_guidance(mode):
        return generated.strip()
    newlines = len(original) - len(original.rstrip("\n"))
    return original + "\n" * max(0, 2 - newlines) + generated.strip()


class Prompter:
    """Rewrite prompts for a frozen LLM. Thread-safe and async-friendly; concurrent calls are batched."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        manifest: Manifest,
        *,
        similarity: SimilarityFn | str | None = "default",
        max_batch_size: int = 16,
        engine: Any = None,
    ) -> None:
        # ``engine``: a backend with GenerationEngine's interface instead of the local model (a served model:
        # alignpro_plugins.serving.remote_prompter); ``model`` and ``tokenizer`` are then unused.
        self.engine = engine or GenerationEngine(
            model, tokenizer, max_batch_size=max_batch_size, name="alignpro-prompter"
        )
        self.manifest = manifest
        self.guard_config = guard.GuardConfig(**manifest.guard)
        self._similarity_spec = manifest.similarity_model if similarity == "default" else similarity
        self._similarity: SimilarityFn | None = None
        self._sim_lock = threading.Lock()
        self._weights_id: str | None = None  # set by from_pretrained for a frozen artifact

    @property
    def model(self) -> Any:
        """The prompter model (base + adapter); a trainer may replace it, generation follows."""
        return self.engine.model

    @model.setter
    def model(self, model: Any) -> None:
        self.engine.model = model

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    # ------------------------------------------------------------------ construction and artifacts
    @classmethod
    def from_base(
        cls,
        base_model: str = "smollm2-135m-instruct",
        *,
        mode: str = "augment",
        device: str | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        **kwargs: Any,
    ) -> Prompter:
        """An untrained (zero-shot) prompter: the base model asked to rewrite with the default template.

        ``base_model`` is a packaged name, a hub id or a folder; the manifest records it portably (see
        :func:`~alignpro_plugins.manifest.portable_base_name`) with its weights hash.
        """
        dev = select_device(device)
        model, tokenizer, path = load_causal_lm(base_model, device=dev, dtype=select_dtype(dtype, dev))
        if Path(base_model).is_dir():  # a relative folder must still resolve from another working directory
            base_model = str(Path(base_model).resolve())
        manifest = Manifest(
            base_model=portable_base_name(base_model), base_model_hash=model_weights_hash(path), mode=mode
        )
        manifest.provenance.setdefault("stages", [])
        return cls(model, tokenizer, manifest, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        base_model: str | None = None,
        verify_base: bool = True,
        allow_unverified_base: bool = False,
        device: str | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        is_trainable: bool = False,
        revision: str | None = None,
        **kwargs: Any,
    ) -> Prompter:
        """Load an artifact written by :meth:`save_pretrained` or a trainer: a local folder, the name of a
        prompter shipped in this package (``"smollm2-135m-prompter"``; ``alignpro models`` lists them), or a
        Hugging Face hub id (downloaded, or taken from the local cache; ``revision`` pins one).

        The base model is the one the manifest names (a packaged name or hub id), or ``base_model`` (a name,
        hub id or local copy); its weights are checked against the recorded hash either way. A tampered or
        broken folder is refused (``ArtifactError``, see :mod:`alignpro_plugins.artifact`). An adapter whose
        base model cannot be verified loads only with ``allow_unverified_base=True``. For inference the LoRA
        adapter is applied without peft; ``is_trainable=True`` loads it with peft (the ``[train]`` extra).
        """
        folder = artifact_folder(path, revision=revision)
        manifest = Manifest.load(folder)
        check_before_loading(
            folder,
            manifest,
            verify_base=verify_base,
            allow_unverified_base=allow_unverified_base,
            similarity=kwargs.get("similarity", "default"),
        )
        base = base_model or base_to_load(folder, manifest)
        dev = select_device(device)
        model, tokenizer, resolved = load_causal_lm(base, device=dev, dtype=select_dtype(dtype, dev))
        verify_base_model(
            folder,
            manifest,
            base,
            resolved,
            verify_base=verify_base,
            allow_unverified_base=allow_unverified_base,
        )
        if manifest.has_adapter:
            model = load_adapter(model, folder, is_trainable=is_trainable)
        tokenizer = _artifact_tokenizer(folder, manifest, tokenizer)
        prompter = cls(model, tokenizer, manifest, **kwargs)
        similarity = kwargs.get("similarity", "default")
        if not is_trainable and not callable(similarity):
            prompter._weights_id = _artifact_weights_id(
                folder, manifest, resolved, f"device={dev};dtype={model.dtype};similarity={similarity}"
            )
        return prompter

    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """Write a portable artifact: the adapter (safetensors), the tokenizer and ``alignpro.json``.

        The base model is referenced by a portable name and its weights hash, not copied. The tokenizer's chat
        template renders a user message as this prompter's query (checked before anything is written), so the
        folder also works with plain transformers + PEFT: ``apply_chat_template([{"role": "user", "content":
        prompt}], add_generation_prompt=True)`` is :meth:`format_query`.
        """
        folder = Path(path)
        mode = self.manifest.mode
        template = checked_chat_template(
            self.tokenizer,
            self.manifest,
            mode,
            lambda prompt, answer=None: self._render(prompt, mode, answer),
        )
        folder.mkdir(parents=True, exist_ok=True)
        base_model = portable_base_name(self.manifest.base_model)
        has_adapter = holds_adapter(self.model)
        if has_adapter:
            save_adapter(self.model, folder, base_model)
        save_tokenizer(self.tokenizer, template, folder)
        manifest = replace(
            self.manifest,
            base_model=base_model,
            has_adapter=has_adapter,
            query_chat_template=query_template(self.tokenizer) or "",
            format_version=FORMAT_VERSION,
        )
        manifest.save(folder)  # last: a folder with a manifest is complete
        self.manifest = manifest
        return folder

    # ------------------------------------------------------------------ formatting
    @property
    def behaviour_id(self) -> str | None:
        """A digest of everything that decides this prompter's rewrites, or None when that cannot be known.

        Known for a frozen artifact loaded by :meth:`from_pretrained`: its base and adapter weights, tokenizer,
        device, dtype and similarity model, and the manifest as it is now (provenance aside: two stages that
        kept the same weights rewrite alike). None for a trainable or in-memory prompter, whose weights may
        change, and for one given a similarity function. Two prompters with the same id give the same greedy
        rewrites, so the evaluation harness answers them once.
        """
        if self._weights_id is None:
            return None
        # The manifest is read now, not at load: a changed generation setting changes the rewrites.
        spec = {k: v for k, v in self.manifest.as_dict().items() if k != "provenance"}
        spec_json = json.dumps(spec, sort_keys=True, default=str)
        return "sha256:" + hashlib.sha256(f"{self._weights_id}\n{spec_json}".encode()).hexdigest()

    def format_query(self, prompt: str, mode: str | None = None, *, answer: str | None = None) -> str:
        """The exact text the prompter model sees for ``prompt`` (trainers use this too).

        In refine mode this is the meta-prompt: the prompt and ``answer``, the frozen model's first answer to it
        (cut to the manifest's ``refine_answer_tokens``, see :meth:`clip_answer`); other modes take no answer.
        """
        mode = self._check_mode(mode)
        if mode == "refine":
            if not isinstance(answer, str):
                raise ValueError(f"{NEEDS_FIRST_ANSWER} (got answer={_given(answer)})")
            return self._render(prompt, mode, self.clip_answer(answer))
        if answer is not None:
            raise ValueError(f"answer= is read in refine mode only; mode {mode!r} formats the prompt alone")
        return self._render(prompt, mode, None)

    def _render(self, prompt: str, mode: str, answer: str | None) -> str:
        """The query with the answer shown as given (the saved chat template renders it so too)."""
        template = self.manifest.instructions[mode]
        if answer is not None:
            user = fill_refine_template(template, prompt, answer)
        else:
            user = template.replace("{prompt}", prompt)
        system = self.manifest.system_prompt
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        # Without a chat template: the plain format prompters have always been trained on.
        return self.engine.format_chat(messages, plain=lambda _: f"{system}\n\n{user}\n\nAnswer:\n")

    def clip_answer(self, answer: str) -> str:
        """The first answer as the meta-prompt shows it: its first ``refine_answer_tokens`` tokens (prompter's
        tokenizer), with :data:`CLIPPED_MARK` where it was cut."""
        limit = self.manifest.refine_answer_tokens
        assert limit is not None  # a manifest with a refine instruction sets it (Manifest.__post_init__)
        ids = self.engine.token_ids([answer])[0]
        if len(ids) <= limit:
            return answer
        return self.tokenizer.decode(ids[:limit]).rstrip() + CLIPPED_MARK

    @property
    def context_limit(self) -> int:
        return (self.engine.max_positions or 2048) - self.manifest.generation.max_new_tokens

    # ------------------------------------------------------------------ guard
    def _similarity_fn(self) -> SimilarityFn | None:
        spec = self._similarity_spec
        if spec is None or callable(spec):
            return spec
        with self._sim_lock:
            if self._similarity is None:
                from alignpro_plugins.embeddings import Embedder

                self._similarity = Embedder(spec).similarity
        return self._similarity

    def _check_mode(self, mode: str | None) -> str:
        """The mode to use; a ValueError (the caller's bug, not a per-prompt failure) when it cannot run."""
        mode = mode or self.manifest.mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode not in self.manifest.instructions:
            raise ValueError(
                f"mode {mode!r} has no instruction template in this prompter's manifest; available modes: "
                f"{available_modes(self.manifest.instructions)}"
            )
        return mode

    def _query_or_passthrough(self, prompt: str, mode: str, answer: str | None = None) -> str | RewriteResult:
        """The query to generate from (formatted once: a refine query tokenizes its answer), or the result that
        passes ``prompt`` through without generating."""
        if not prompt.strip():
            return RewriteResult(prompt, prompt, mode, None, guard.EMPTY_INPUT)
        try:
            query = self.format_query(prompt, mode, answer=answer)
            n_tokens = len(self.engine.token_ids([query])[0])
        except Exception as exc:  # e.g. a lone surrogate (json.loads('"\\ud800"')) the tokenizer rejects
            logger.warning("cannot tokenize the prompt (%s); passing it through", exc)
            return RewriteResult(
                prompt, prompt, mode, None, f"{guard.PROMPTER_ERROR}: cannot tokenize: {exc}"
            )
        if n_tokens > self.context_limit:
            return RewriteResult(prompt, prompt, mode, None, guard.INPUT_TOO_LONG)
        return query

    def finalize(self, prompt: str, raw: str, hit_limit: bool, mode: str) -> RewriteResult:
        """Apply the intent guard to one raw generation and build the result."""
        try:
            cleaned, reason = guard.check_rewrite(
                prompt,
                raw,
                mode="augment" if appends_guidance(mode) else mode,  # refine writes guidance, as augment
                hit_token_limit=hit_limit,
                config=self.guard_config,
                similarity=self._similarity_fn() if mode == "rewrite" else None,
            )
        except Exception as exc:  # a broken similarity model must not lose the prompt
            logger.warning("intent guard failed (%s); passing the prompt through", exc)
            return RewriteResult(prompt, prompt, mode, raw, f"{guard.PROMPTER_ERROR}: {exc}")
        if reason is not None:
            return RewriteResult(prompt, prompt, mode, cleaned or None, reason)
        return RewriteResult(prompt, compose(prompt, cleaned, mode), mode, cleaned, None)

    # ------------------------------------------------------------------ public API
    def _settings(self, overrides: dict[str, Any]) -> GenerationSettings:
        check_generation_kwargs(overrides)
        # The manifest is read per call: a changed generation setting applies to the next rewrite.
        defaults = replace(self.manifest.generation, **{k: v for k, v in overrides.items() if v is not None})
        return GenerationSettings.from_defaults(defaults)

    def _answers(self, prompts: list[str], mode: str, given: Any) -> list[str | None]:
        """Per prompt, the first answer its query shows: refine mode's (given, else the gate's), else None."""
        if mode != "refine":
            return [None] * len(prompts)
        if given is None:  # inside a RetryGate's retry step the gate has put the first answers in context
            found = [first_answer(p) for p in prompts]
            missing = [i for i, a in enumerate(found) if a is None]
            if missing:
                raise ValueError(f"{NEEDS_FIRST_ANSWER}; none is known for prompts[{missing[0]}]")
            return list(found)
        answers = _checked_prompts(given, what="first answers")
        if len(answers) != len(prompts):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(answers)} first answers; give one first answer per prompt"
            )
        return list(answers)

    def _submit(
        self, prompts: Any, mode: str | None, overrides: dict[str, Any], answers: Any = None
    ) -> tuple[list[str], str, list[RewriteResult | None], dict[int, Future[Generation]]]:
        prompts = _checked_prompts(prompts)
        mode = self._check_mode(mode)
        firsts = self._answers(prompts, mode, answers)
        settings = self._settings(overrides)
        checked = [self._query_or_passthrough(p, mode, a) for p, a in zip(prompts, firsts, strict=True)]
        prechecked = [c if isinstance(c, RewriteResult) else None for c in checked]
        futures = {i: self.engine.submit(c, settings) for i, c in enumerate(checked) if isinstance(c, str)}
        return prompts, mode, prechecked, futures

    def _collect(
        self,
        prompts: list[str],
        mode: str,
        prechecked: list[RewriteResult | None],
        generated: dict[int, Generation | BaseException],
    ) -> list[RewriteResult]:
        out = []
        for i, (p, pre) in enumerate(zip(prompts, prechecked, strict=True)):
            if pre is not None:
                out.append(pre)
                continue
            gen = generated[i]
            if isinstance(gen, BaseException):
                logger.warning("prompter generation failed (%s); passing the prompt through", gen)
                out.append(RewriteResult(p, p, mode, None, f"{guard.PROMPTER_ERROR}: {gen}"))
            else:
                out.append(self.finalize(p, gen.text, not gen.ended, mode))
        return out

    def rewrite(self, prompt: str, *, mode: str | None = None, **overrides: Any) -> str:
        """The target's input for ``prompt`` (the original when the prompter's output was rejected)."""
        return self.rewrite_results([_checked_prompt(prompt)], mode=mode, **overrides)[0].text

    def rewrite_batch(
        self, prompts: Sequence[str], *, mode: str | None = None, **overrides: Any
    ) -> list[str]:
        """The target's input for each prompt, in order (see :meth:`rewrite_results`)."""
        return [r.text for r in self.rewrite_results(prompts, mode=mode, **overrides)]

    def rewrite_results(
        self, prompts: Sequence[str], *, mode: str | None = None, **overrides: Any
    ) -> list[RewriteResult]:
        """Rewrite many prompts in real batches, one result per prompt, in order.

        A prompt that cannot be rewritten (empty, too long, untokenizable, generation or guard failure) comes
        back unchanged with ``fallback_reason`` set; that never raises. Bad call arguments do raise, before
        any generation: prompts that are not a list or tuple of str (``TypeError`` naming what was given),
        an unknown ``mode`` or one without an instruction template, or an unknown generation override
        (``ValueError`` listing the accepted ones). Refine mode needs each prompt's first answer: inside a
        :class:`~alignpro_plugins.gate.RetryGate`'s retry step the gate gives it, elsewhere this raises a
        ``ValueError`` pointing to :meth:`refine_results`.
        """
        return self._results(*self._submit(prompts, mode, overrides))

    def _results(
        self,
        prompts: list[str],
        mode: str,
        prechecked: list[RewriteResult | None],
        futures: dict[int, Future[Generation]],
    ) -> list[RewriteResult]:
        generated: dict[int, Generation | BaseException] = {}
        for i, fut in futures.items():
            try:
                generated[i] = fut.result()
            except Exception as exc:
                generated[i] = exc
        return self._collect(prompts, mode, prechecked, generated)

    async def arewrite(self, prompt: str, *, mode: str | None = None, **overrides: Any) -> str:
        """Async :meth:`rewrite`."""
        return (await self.arewrite_results([_checked_prompt(prompt)], mode=mode, **overrides))[0].text

    async def arewrite_batch(
        self, prompts: Sequence[str], *, mode: str | None = None, **overrides: Any
    ) -> list[str]:
        """Async :meth:`rewrite_batch`."""
        return [r.text for r in await self.arewrite_results(prompts, mode=mode, **overrides)]

    async def arewrite_results(
        self, prompts: Sequence[str], *, mode: str | None = None, **overrides: Any
    ) -> list[RewriteResult]:
        """Async :meth:`rewrite_results`, with the same contract; the event loop keeps serving meanwhile."""
        return await self._aresults(*self._submit(prompts, mode, overrides))

    async def _aresults(
        self,
        prompts: list[str],
        mode: str,
        prechecked: list[RewriteResult | None],
        futures: dict[int, Future[Generation]],
    ) -> list[RewriteResult]:
        wrapped = [asyncio.wrap_future(f) for f in futures.values()]
        done = await asyncio.gather(*wrapped, return_exceptions=True)
        return self._collect(prompts, mode, prechecked, dict(zip(futures.keys(), done, strict=True)))

    def sample_rewrites(
        self, prompts: Sequence[str], k: int, *, mode: str | None = None, **overrides: Any
    ) -> list[list[RewriteResult]]:
        """``k`` sampled rewrites per prompt, drawn together in one batched generation (``num_return_sequences``).

        For best-of-K selection: one decode loop gives all K candidates, where K calls of :meth:`rewrite_results`
        would run K loops. Sampling is on (``do_sample=True``) unless overridden; each candidate passes the
        intent guard on its own, so a rejected one is the original prompt with its ``fallback_reason``; a
        generation that fails falls back for its batch only. Bad arguments raise as in :meth:`rewrite_results`,
        ``k`` must be a positive int, and ``k > 1`` needs sampling (greedy decoding has one answer per prompt).
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int (candidates per prompt), got {k!r}")
        overrides.setdefault("do_sample", True)
        prompts = _checked_prompts(prompts)
        mode = self._check_mode(mode)
        firsts = self._answers(prompts, mode, None)
        settings = self._settings(overrides)
        if k > 1 and not settings.do_sample:
            raise ValueError(
                f"k={k} candidates need sampling, but the settings are greedy (do_sample={overrides['do_sample']!r}"
                f", manifest default {self.manifest.generation.do_sample!r}): greedy decoding gives one rewrite "
                "per prompt. Pass do_sample=True (the default here when not given) or use k=1 / rewrite_results"
            )
        checked = [self._query_or_passthrough(p, mode, a) for p, a in zip(prompts, firsts, strict=True)]
        prechecked = [c if isinstance(c, RewriteResult) else None for c in checked]
        todo = [i for i, c in enumerate(checked) if isinstance(c, str)]
        queries = [c for c in checked if isinstance(c, str)]
        generated = self.engine.generate(queries, settings, k, return_exceptions=True)
        rows = dict(zip(todo, generated, strict=True))
        out: list[list[RewriteResult]] = []
        for i, (p, pre) in enumerate(zip(prompts, prechecked, strict=True)):
            row = rows.get(i)
            if pre is not None:
                out.append([pre] * k)
            elif isinstance(row, list):
                out.append([self.finalize(p, g.text, not g.ended, mode) for g in row])
            else:  # nothing the user gave is lost: its candidates are the prompt
                logger.warning("prompter generation failed (%s); passing the prompt through", row)
                out.append([RewriteResult(p, p, mode, None, f"{guard.PROMPTER_ERROR}: {row}")] * k)
        return out

    # ------------------------------------------------------------------ refinement (mode "refine")
    def refine(self, prompt: str, first_answer: str, **overrides: Any) -> str:
        """The target's second input for ``prompt`` given its ``first_answer``: x plus the guidance the prompter
        writes after reading that answer, or x itself when the refinement was rejected (see
        :meth:`refine_results`)."""
        return self.refine_results(
            [_checked_prompt(prompt, verb="refine")],
            [_checked_prompt(first_answer, "first answer", "refine")],
            **overrides,
        )[0].text

    def refine_batch(
        self, prompts: Sequence[str], first_answers: Sequence[str], **overrides: Any
    ) -> list[str]:
        """:meth:`refine` for many prompts, in order."""
        return [r.text for r in self.refine_results(prompts, first_answers, **overrides)]

    def refine_results(
        self, prompts: Sequence[str], first_answers: Sequence[str], **overrides: Any
    ) -> list[RewriteResult]:
        """Refine many prompts in real batches: per prompt, the guidance written from (x, its first answer).

        The contract is :meth:`rewrite_results`' in refine mode (the intent guard applies; a refinement that
        fails comes back as x with ``fallback_reason``), with one first answer per prompt, a list or tuple of str.
        """
        return self._results(*self._submit(prompts, "refine", overrides, first_answers))

    async def arefine(self, prompt: str, first_answer: str, **overrides: Any) -> str:
        """Async :meth:`refine`."""
        results = await self.arefine_results(
            [_checked_prompt(prompt, verb="refine")],
            [_checked_prompt(first_answer, "first answer", "refine")],
            **overrides,
        )
        return results[0].text

    async def arefine_batch(
        self, prompts: Sequence[str], first_answers: Sequence[str], **overrides: Any
    ) -> list[str]:
        """Async :meth:`refine_batch`."""
        return [r.text for r in await self.arefine_results(prompts, first_answers, **overrides)]

    async def arefine_results(
        self, prompts: Sequence[str], first_answers: Sequence[str], **overrides: Any
    ) -> list[RewriteResult]:
        """Async :meth:`refine_results`."""
        return await self._aresults(*self._submit(prompts, "refine", overrides, first_answers))

    def close(self) -> None:
        self.engine.close()

    def __repr__(self) -> str:
        m = self.manifest
        return f"Prompter(base_model={m.base_model!r}, mode={m.mode!r}, adapter={holds_adapter(self.model)})"


def _given(value: object) -> str:
    return "None" if value is None else type(value).__name__


def _checked_prompt(prompt: object, what: str = "prompt", verb: str = "rewrite") -> str:
    if not isinstance(prompt, str):
        raise TypeError(
            f"Prompter accepts one str {what} here, got {_given(prompt)}; for many prompts pass a list or "
            f"tuple of str to {verb}_batch / {verb}_results"
        )
    return prompt


def _checked_prompts(prompts: object, what: str = "prompts") -> list[str]:
    """The prompts as a list; bad call arguments raise before any work starts, so none is half-processed."""
    if isinstance(prompts, str):  # iterating it would rewrite it character by character
        raise TypeError(
            f"expected a list or tuple of str {what}, got one str; use rewrite(prompt) / refine(prompt, "
            "first_answer) for one prompt"
        )
    if not isinstance(prompts, (list, tuple)):  # a dict or a set would silently rewrite keys in no set order
        raise TypeError(
            f"Prompter accepts a list or tuple of str {what}, got {_given(prompts)}; nothing was rewritten"
        )
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(
                f"Prompter accepts str {what} only: {what.replace(' ', '_')}[{i}] is {_given(p)}; nothing was "
                "rewritten"
            )
    return list(prompts)


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)


def _artifact_tokenizer(folder: Path, manifest: Manifest, base_tokenizer: Any) -> Any:
    """The artifact's own tokenizer (else the base model's), rendering queries with the manifest's template.

    From format 2 the folder's tokenizer carries the chat template for plain tools; the prompter's query uses
    ``query_chat_template`` instead, so it does not depend on the base folder's tokenizer files either.
    """
    tokenizer = base_tokenizer
    if (folder / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    if manifest.query_chat_template is not None:
        tokenizer.chat_template = manifest.query_chat_template or None
    return tokenizer


def _artifact_weights_id(folder: Path, manifest: Manifest, base_path: str, runtime: str) -> str:
    """The files and runtime half of :attr:`Prompter.behaviour_id`: base and adapter weights, tokenizer."""
    # A base model given by name (not a folder) is identified by the name: its files are transformers' business.
    digest = hashlib.sha256(f"base={folder_weights_hash(base_path) or base_path};{runtime}".encode())
    if manifest.has_adapter:
        digest.update(weights_hash(folder).encode())
    # The artifact's tokenizer if it has one, else the base folder's (from_pretrained loads it from there).
    tok_dir = folder if (folder / "tokenizer_config.json").exists() else Path(base_path)
    for name in _TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            data = (tok_dir / name).read_bytes()
            # Length-prefixed, so no two different file sets hash alike.
            digest.update(f"{name}:{len(data)}:".encode() + data)
    return "sha256:" + digest.hexdigest()
