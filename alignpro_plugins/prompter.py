"""The prompter runtime: a small LM (+ LoRA adapter) that rewrites a user prompt for a frozen target LLM.

``Prompter`` owns generation, batching, the intent guard and the artifact format. The LangChain and DSPy
adapters, the trainers and the evaluation harness all go through it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch

from alignpro_plugins import guard
from alignpro_plugins.artifact import BaseModelMismatchError as BaseModelMismatchError  # re-exported
from alignpro_plugins.artifact import check_before_loading, load_adapter, verify_base_model
from alignpro_plugins.batching import MicroBatcher, plan_batches
from alignpro_plugins.manifest import (
    MODES,
    GenerationDefaults,
    Manifest,
    available_modes,
    check_dtype,
    check_generation_kwargs,
    weights_hash,
)
from alignpro_plugins.models import resolve_model

logger = logging.getLogger(__name__)

SimilarityFn = Callable[[Sequence[str], Sequence[str]], list[float]]


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
    """The target's input for a given prompter output."""
    return f"{original.rstrip()}\n\n{generated.strip()}" if mode == "augment" else generated.strip()


def _select_device(device: str | None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _select_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        # fp32 on CPU: most CPUs emulate bf16 (about 5x slower), and where it is native (AMX) it is faster but
        # gives other outputs (docs/benchmarks.md, "Frozen-target backends"), so bf16 there is an explicit choice.
        return (
            torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
        )
    check_dtype(dtype)
    return getattr(torch, str(dtype))


def load_causal_lm(name_or_path: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)  # type: ignore[arg-type]
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, path


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
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.tokenizer.padding_side = "left"  # batched decoder-only generation needs left padding
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.guard_config = guard.GuardConfig(**manifest.guard)
        self._similarity_spec = manifest.similarity_model if similarity == "default" else similarity
        self._similarity: SimilarityFn | None = None
        self._sim_lock = threading.Lock()
        self._generate_lock = threading.Lock()
        self._batcher: MicroBatcher[str, tuple[str, bool]] = MicroBatcher(
            self._generate_key, max_batch_size=max_batch_size, name="alignpro-prompter"
        )
        self._weights_id: str | None = None  # set by from_pretrained for a frozen artifact

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
        """An untrained (zero-shot) prompter: the base model asked to rewrite with the default template."""
        dev = _select_device(device)
        model, tokenizer, path = load_causal_lm(base_model, device=dev, dtype=_select_dtype(dtype, dev))
        if Path(base_model).is_dir():  # a relative folder must still resolve from another working directory
            base_model = str(Path(base_model).resolve())
        manifest = Manifest(base_model=base_model, base_model_hash=_hash_or_none(path), mode=mode)
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
        **kwargs: Any,
    ) -> Prompter:
        """Load an artifact folder written by :meth:`save_pretrained` or a trainer.

        A tampered or broken folder is refused (``ArtifactError``, see :mod:`alignpro_plugins.artifact`). An
        adapter whose base model cannot be verified loads only with ``allow_unverified_base=True``.
        """
        folder = Path(path)
        manifest = Manifest.load(folder)
        check_before_loading(
            folder,
            manifest,
            verify_base=verify_base,
            allow_unverified_base=allow_unverified_base,
            similarity=kwargs.get("similarity", "default"),
        )
        base = base_model or manifest.base_model
        recorded = Path(manifest.base_model)
        if base_model is None and recorded.is_absolute() and not recorded.exists():
            # A base folder recorded on another machine; transformers would misread it as a hub id.
            raise FileNotFoundError(
                f"The prompter in {folder} needs its base model folder {manifest.base_model}, which does not "
                "exist here (was the artifact copied from another machine?). Pass the same base model with "
                "Prompter.from_pretrained(path, base_model=<name, hub id or folder>); its weights are still "
                "checked against the recorded hash."
            )
        dev = _select_device(device)
        model, tokenizer, resolved = load_causal_lm(base, device=dev, dtype=_select_dtype(dtype, dev))
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
        if (folder / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(folder))
        prompter = cls(model, tokenizer, manifest, **kwargs)
        similarity = kwargs.get("similarity", "default")
        if not is_trainable and not callable(similarity):
            prompter._weights_id = _artifact_weights_id(
                folder, manifest, resolved, f"device={dev};dtype={model.dtype};similarity={similarity}"
            )
        return prompter

    def save_pretrained(self, path: str | os.PathLike[str]) -> Path:
        """Write the adapter (safetensors) and ``alignpro.json``; the base model is referenced, not copied."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        has_adapter = hasattr(self.model, "peft_config")
        if has_adapter:
            self.model.save_pretrained(str(folder), safe_serialization=True)
        manifest = replace(self.manifest, has_adapter=has_adapter)
        manifest.save(folder)
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
        spec = {k: v for k, v in asdict(self.manifest).items() if k != "provenance"}
        spec_json = json.dumps(spec, sort_keys=True, default=str)
        return "sha256:" + hashlib.sha256(f"{self._weights_id}\n{spec_json}".encode()).hexdigest()

    def format_query(self, prompt: str, mode: str | None = None) -> str:
        """The exact text the prompter model sees for ``prompt`` (trainers use this too)."""
        mode = self._check_mode(mode)
        user = self.manifest.instructions[mode].replace("{prompt}", prompt)
        messages = [
            {"role": "system", "content": self.manifest.system_prompt},
            {"role": "user", "content": user},
        ]
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{self.manifest.system_prompt}\n\n{user}\n\nAnswer:\n"

    @property
    def context_limit(self) -> int:
        cfg = getattr(self.model, "config", None)
        limit = getattr(cfg, "max_position_embeddings", None) or 2048
        return int(limit) - self.manifest.generation.max_new_tokens

    # ------------------------------------------------------------------ generation
    def generate_raw(
        self,
        queries: Sequence[str],
        settings: GenerationDefaults | None = None,
        num_return_sequences: int = 1,
    ) -> list[list[tuple[str, bool]]]:
        """Batched generation on formatted queries: per query, ``num_return_sequences`` (text, hit_limit)."""
        settings = settings or self.manifest.generation
        return cast(
            list[list[tuple[str, bool]]], self._generate_rows(queries, settings, num_return_sequences)
        )

    def _generate_rows(
        self,
        queries: Sequence[str],
        settings: GenerationDefaults,
        num_return_sequences: int,
        *,
        per_batch_errors: bool = False,
    ) -> list[list[tuple[str, bool]] | Exception]:
        """Per query, its rows; with ``per_batch_errors`` a failing call fails only its own queries (their
        entry is the error, the other calls still run) instead of raising."""
        if not queries:
            return []
        results: list[list[tuple[str, bool]] | Exception] = [[] for _ in queries]
        try:
            # Calls grouped by query length so that few rows are padded far (see plan_batches); order restored.
            lengths = [
                len(ids) for ids in self.tokenizer(list(queries), add_special_tokens=False)["input_ids"]
            ]
            plan = plan_batches(
                lengths, new_tokens=settings.max_new_tokens, rows_per_item=num_return_sequences
            )
        except Exception as exc:  # e.g. the tokenizer failed: every query falls back
            if not per_batch_errors:
                raise
            logger.warning("prompter generation failed (%s); passing %d prompts through", exc, len(queries))
            return [exc] * len(queries)
        for idx in plan:
            try:
                rows: list[Any] = self._generate_call(
                    [queries[i] for i in idx], settings, num_return_sequences
                )
                if len(rows) != len(idx):
                    raise RuntimeError(f"generate returned {len(rows)} rows for {len(idx)} queries")
            except Exception as exc:  # the other batches' candidates still count
                if not per_batch_errors:
                    raise
                logger.warning("prompter generation failed (%s); passing %d prompts through", exc, len(idx))
                rows = [exc] * len(idx)
            for i, row in zip(idx, rows, strict=True):
                results[i] = row
        return results

    def _generate_call(
        self, queries: list[str], settings: GenerationDefaults, num_return_sequences: int
    ) -> list[list[tuple[str, bool]]]:
        """One batched ``generate`` call on formatted queries."""
        tok = self.tokenizer
        enc = tok(queries, return_tensors="pt", padding=True, add_special_tokens=False)
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        gen_kwargs: dict[str, Any] = dict(
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.do_sample,
            repetition_penalty=settings.repetition_penalty,
            num_return_sequences=num_return_sequences,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            use_cache=True,
        )
        if settings.do_sample:
            gen_kwargs.update(temperature=settings.temperature, top_p=settings.top_p)
        else:
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        with self._generate_lock, torch.inference_mode():
            was_training = self.model.training
            self.model.eval()
            out = self.model.generate(**enc, **gen_kwargs)
            if was_training:
                self.model.train()
        new = out[:, enc["input_ids"].shape[1] :]
        results: list[list[tuple[str, bool]]] = []
        for i in range(len(queries)):
            row = []
            for j in range(num_return_sequences):
                ids = new[i * num_return_sequences + j]
                hit_limit = not bool((ids == tok.eos_token_id).any()) and not bool(
                    (ids == tok.pad_token_id).any()
                )
                row.append((tok.decode(ids, skip_special_tokens=True), hit_limit))
            results.append(row)
        return results

    def _generate_key(self, key: Any, queries: list[str]) -> list[tuple[str, bool]]:
        settings = GenerationDefaults(**dict(key))
        return [r[0] for r in self.generate_raw(queries, settings)]

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

    def _precheck(self, prompt: str, mode: str) -> RewriteResult | None:
        if not prompt.strip():
            return RewriteResult(prompt, prompt, mode, None, guard.EMPTY_INPUT)
        try:
            n_tokens = len(
                self.tokenizer(self.format_query(prompt, mode), add_special_tokens=False)["input_ids"]
            )
        except Exception as exc:  # e.g. a lone surrogate (json.loads('"\\ud800"')) the tokenizer rejects
            logger.warning("cannot tokenize the prompt (%s); passing it through", exc)
            return RewriteResult(
                prompt, prompt, mode, None, f"{guard.PROMPTER_ERROR}: cannot tokenize: {exc}"
            )
        if n_tokens > self.context_limit:
            return RewriteResult(prompt, prompt, mode, None, guard.INPUT_TOO_LONG)
        return None

    def finalize(self, prompt: str, raw: str, hit_limit: bool, mode: str) -> RewriteResult:
        """Apply the intent guard to one raw generation and build the result."""
        try:
            cleaned, reason = guard.check_rewrite(
                prompt,
                raw,
                mode=mode,
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
    def _settings_key(self, **overrides: Any) -> tuple:
        check_generation_kwargs(overrides)
        settings = replace(self.manifest.generation, **{k: v for k, v in overrides.items() if v is not None})
        return tuple(sorted(asdict(settings).items()))

    def _submit(self, prompts: Sequence[Any], mode: str | None, overrides: dict[str, Any]):
        prompts = _checked_prompts(prompts)
        mode = self._check_mode(mode)
        key = self._settings_key(**overrides)
        prechecked = [self._precheck(p, mode) for p in prompts]
        futures = {
            i: self._batcher.submit(key, self.format_query(p, mode))
            for i, (p, pre) in enumerate(zip(prompts, prechecked, strict=True))
            if pre is None
        }
        return prompts, mode, prechecked, futures

    def _collect(self, prompts, mode, prechecked, raws: dict[int, Any]) -> list[RewriteResult]:
        out = []
        for i, (p, pre) in enumerate(zip(prompts, prechecked, strict=True)):
            if pre is not None:
                out.append(pre)
                continue
            raw = raws[i]
            if isinstance(raw, BaseException):
                logger.warning("prompter generation failed (%s); passing the prompt through", raw)
                out.append(RewriteResult(p, p, mode, None, f"{guard.PROMPTER_ERROR}: {raw}"))
            else:
                out.append(self.finalize(p, raw[0], raw[1], mode))
        return out

    def rewrite_results(
        self, prompts: Sequence[str], *, mode: str | None = None, **overrides: Any
    ) -> list[RewriteResult]:
        """Rewrite many prompts in real batches, one result per prompt, in order.

        A prompt that cannot be rewritten (empty, too long, untokenizable, generation or guard failure) comes
        back unchanged with ``fallback_reason`` set; that never raises. Bad call arguments do raise, before
        any generation: a non-str element (``TypeError`` naming its index), an unknown ``mode`` or one
        without an instruction template, or an unknown generation override (``ValueError`` listing the
        accepted ones).
        """
        prompts, mode, prechecked, futures = self._submit(prompts, mode, overrides)
        raws: dict[int, Any] = {}
        for i, fut in futures.items():
            try:
                raws[i] = fut.result()
            except Exception as exc:
                raws[i] = exc
        return self._collect(prompts, mode, prechecked, raws)

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
        settings = GenerationDefaults(**dict(self._settings_key(**overrides)))
        if k > 1 and not settings.do_sample:
            raise ValueError(
                f"k={k} candidates need sampling, but the settings are greedy (do_sample={overrides['do_sample']!r}"
                f", manifest default {self.manifest.generation.do_sample!r}): greedy decoding gives one rewrite "
                "per prompt. Pass do_sample=True (the default here when not given) or use k=1 / rewrite_results"
            )
        prechecked = [self._precheck(p, mode) for p in prompts]
        todo = [i for i, pre in enumerate(prechecked) if pre is None]
        queries = [self.format_query(prompts[i], mode) for i in todo]
        rows = dict(zip(todo, self._generate_rows(queries, settings, k, per_batch_errors=True), strict=True))
        out: list[list[RewriteResult]] = []
        for i, (p, pre) in enumerate(zip(prompts, prechecked, strict=True)):
            row = rows.get(i)
            if pre is not None:
                out.append([pre] * k)
            elif isinstance(row, list):
                out.append([self.finalize(p, raw, hit_limit, mode) for raw, hit_limit in row])
            else:  # nothing the user gave is lost: its candidates are the prompt
                out.append([RewriteResult(p, p, mode, None, f"{guard.PROMPTER_ERROR}: {row}")] * k)
        return out

    async def asample_rewrites(
        self, prompts: Sequence[str], k: int, *, mode: str | None = None, **overrides: Any
    ) -> list[list[RewriteResult]]:
        """Async :meth:`sample_rewrites`, run in a worker thread so the event loop keeps serving."""
        return await asyncio.to_thread(self.sample_rewrites, prompts, k, mode=mode, **overrides)

    def rewrite_result(self, prompt: str, *, mode: str | None = None, **overrides: Any) -> RewriteResult:
        return self.rewrite_results([prompt], mode=mode, **overrides)[0]

    def rewrite(self, prompt: str, *, mode: str | None = None, **overrides: Any) -> str:
        """The target's input for ``prompt`` (the original when the prompter's output was rejected)."""
        return self.rewrite_result(prompt, mode=mode, **overrides).text

    def rewrite_batch(
        self, prompts: Sequence[str], *, mode: str | None = None, **overrides: Any
    ) -> list[str]:
        return [r.text for r in self.rewrite_results(prompts, mode=mode, **overrides)]

    async def arewrite_results(
        self, prompts: Sequence[str], *, mode: str | None = None, **overrides: Any
    ) -> list[RewriteResult]:
        """Async :meth:`rewrite_results`, with the same contract."""
        prompts, mode, prechecked, futures = self._submit(prompts, mode, overrides)
        wrapped = [asyncio.wrap_future(f) for f in futures.values()]
        done = await asyncio.gather(*wrapped, return_exceptions=True)
        return self._collect(prompts, mode, prechecked, dict(zip(futures.keys(), done, strict=True)))

    async def arewrite_result(
        self, prompt: str, *, mode: str | None = None, **overrides: Any
    ) -> RewriteResult:
        return (await self.arewrite_results([prompt], mode=mode, **overrides))[0]

    async def arewrite(self, prompt: str, *, mode: str | None = None, **overrides: Any) -> str:
        return (await self.arewrite_result(prompt, mode=mode, **overrides)).text

    async def arewrite_batch(
        self, prompts: Sequence[str], *, mode: str | None = None, **overrides: Any
    ) -> list[str]:
        return [r.text for r in await self.arewrite_results(prompts, mode=mode, **overrides)]

    def close(self) -> None:
        self._batcher.close()

    def __repr__(self) -> str:
        m = self.manifest
        return f"Prompter(base_model={m.base_model!r}, mode={m.mode!r}, adapter={hasattr(self.model, 'peft_config')})"


def _checked_prompts(prompts: Sequence[Any]) -> list[str]:
    """The prompts as a list; bad call arguments raise before any work starts, so none is half-processed."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError(
            f"expected a list of str prompts, got one {type(prompts).__name__}; use "
            "rewrite_result(prompt) for a single prompt"
        )
    prompts = list(prompts)
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(
                f"Prompter accepts str prompts only: prompts[{i}] is {type(p).__name__}; nothing was rewritten"
            )
    return prompts


def _hash_or_none(path: str) -> str | None:
    return weights_hash(path) if Path(path).is_dir() else None


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


def _artifact_weights_id(folder: Path, manifest: Manifest, base_path: str, runtime: str) -> str:
    """The files and runtime half of :attr:`Prompter.behaviour_id`: base and adapter weights, tokenizer."""
    # A base model given by name (not a folder) is identified by the name: its files are transformers' business.
    digest = hashlib.sha256(f"base={_hash_or_none(base_path) or base_path};{runtime}".encode())
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
