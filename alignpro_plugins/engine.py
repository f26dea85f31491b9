"""The one local generation engine: a Hugging Face causal LM and its tokenizer, shared by every local model.

``Prompter``, ``TransformersTarget``, LangChain's ``ChatLocalTransformers`` and DSPy's ``LocalTransformersLM``
all generate through :class:`GenerationEngine`: chat-template formatting, calls grouped by prompt length,
greedy or sampled decoding, k sequences per prompt, stop strings, an "ended or cut at max_new_tokens" flag,
micro-batching of concurrent callers and token streaming. It is the only module that calls ``generate``.

Thread safety: one ``generate`` at a time per engine (a lock), and the tokenizer is only ever asked for
unpadded encodings (under another lock); padding is done here. A fast tokenizer's padding settings are state
on its shared Rust object, so a padded encode in one thread and an unpadded one in another could otherwise
corrupt each other's batches ("Unable to create tensor").
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from alignpro_plugins.batching import MicroBatcher, plan_batches
from alignpro_plugins.manifest import check_dtype, weights_hash
from alignpro_plugins.models import resolve_model

if TYPE_CHECKING:  # torch is imported where it runs: a remote prompter's engine needs no torch
    import torch

    from alignpro_plugins.manifest import GenerationDefaults

Messages = Sequence[dict[str, str]]


# ---------------------------------------------------------------------------------------------- loading
def select_device(device: str | None) -> str:
    """``"auto"`` or None: ``"cuda"`` when a GPU is available, else ``"cpu"``; anything else as given."""
    if device in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def select_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``"auto"`` or None: bf16 on a CUDA GPU that supports it, fp32 elsewhere; or a name from ``DTYPES``."""
    import torch

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


def load_causal_lm(name_or_path: str, *, device: str = "cpu", dtype: torch.dtype | None = None):
    """(model in eval mode, tokenizer with a pad token, resolved path) for a packaged name, folder or hub id;
    ``dtype`` None is fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = dtype or torch.float32

    path = resolve_model(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)  # type: ignore[arg-type]
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, path


def folder_weights_hash(path: str) -> str | None:
    """The weights hash of a model folder, or None for a hub id (no folder to hash)."""
    return weights_hash(path) if Path(path).is_dir() else None


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class GenerationSettings:
    """How to decode. Calls with equal settings may share a batch.

    A None knob is not passed to ``generate``, so the model's generation config (or transformers' default)
    applies; ``top_k=0`` and ``top_p=1.0`` switch those filters off. The sampling knobs count only when
    ``do_sample``. ``seed`` seeds torch's RNG right before a sampled call.
    """

    max_new_tokens: int
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: tuple[str, ...] = ()
    max_time: float | None = None
    seed: int | None = None

    @classmethod
    def from_defaults(cls, defaults: GenerationDefaults) -> GenerationSettings:
        """A prompter manifest's generation settings (its top_k is the model's default)."""
        sample = defaults.do_sample
        return cls(
            max_new_tokens=defaults.max_new_tokens,
            do_sample=sample,
            temperature=defaults.temperature if sample else None,
            top_p=defaults.top_p if sample else None,
            repetition_penalty=defaults.repetition_penalty,
        )

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample}
        if self.do_sample:
            knobs = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
            kwargs.update({k: v for k, v in knobs.items() if v is not None})
        else:  # greedy; unset the sampling knobs so transformers does not warn about the model's defaults
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.repetition_penalty is not None:
            kwargs["repetition_penalty"] = self.repetition_penalty
        if self.max_time is not None:
            kwargs["max_time"] = self.max_time
        return kwargs


@dataclass(frozen=True)
class Generation:
    """One generated sequence.

    ``text`` is the decoded new tokens (special tokens skipped), cut before the first stop string.
    ``ended`` is False when generation was cut at ``max_new_tokens`` (or ``max_time``) rather than ending at
    an EOS token or a stop string.
    """

    text: str
    ended: bool
    input_tokens: int
    output_tokens: int


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` before the first stop string, and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def _stopping_criteria(tokenizer: Any, stop: Sequence[str], prompt_len: int, cancel: threading.Event | None):
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnStrings(StoppingCriteria):
        """Per-row stop when the newly generated text contains a stop string."""

        def __init__(self) -> None:
            # A stop string spans at most one token per byte, plus a partial token at each end.
            self.window = max(len(s.encode()) for s in stop) + 2

        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> Any:
            tails = input_ids[:, prompt_len:][:, -self.window :]
            texts = tokenizer.batch_decode(tails, skip_special_tokens=True)
            done = [any(s in t for s in stop) for t in texts]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    class Cancelled(StoppingCriteria):
        """Stops a streaming generation whose consumer went away or saw a stop string."""

        def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> Any:
            flag = cancel is not None and cancel.is_set()
            return torch.full((input_ids.shape[0],), flag, dtype=torch.bool, device=input_ids.device)

    criteria: list[Any] = []
    if stop:
        criteria.append(StopOnStrings())
    if cancel is not None:
        criteria.append(Cancelled())
    return StoppingCriteriaList(criteria)


def plain_chat_text(messages: Messages) -> str:
    """A chat as plain text, for a tokenizer without a chat template."""
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


def merge_roles(messages: Messages) -> list[dict[str, str]]:
    """Same-role runs merged and system text folded into the first user turn, for strict chat templates."""
    merged: list[dict[str, str]] = []
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    for m in messages:
        if m["role"] == "system":
            continue
        role = "user" if m["role"] in ("user", "tool") else "assistant"
        if merged and merged[-1]["role"] == role:
            merged[-1] = {"role": role, "content": merged[-1]["content"] + "\n\n" + m["content"]}
        else:
            merged.append({"role": role, "content": m["content"]})
    if system and merged and merged[0]["role"] == "user":
        merged[0] = {"role": "user", "content": f"{system}\n\n{merged[0]['content']}"}
    return merged


# ---------------------------------------------------------------------------------------------- the engine
class GenerationEngine:
    """Generation with one causal LM and its tokenizer. Thread-safe; concurrent :meth:`submit` calls share
    batched ``generate`` calls.

    ``model`` may be replaced (a trainer swaps in its trained adapter); the engine always generates with the
    current one, switching a model in training mode to eval for the call and back afterwards.
    """

    def __init__(
        self, model: Any, tokenizer: Any, *, max_batch_size: int = 16, name: str = "alignpro-engine"
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"  # batched decoder-only generation needs left padding
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._generate_lock = threading.Lock()
        self._encode_lock = threading.Lock()
        self._batcher: MicroBatcher[str, Generation] = MicroBatcher(
            self._generate_queued, max_batch_size=max_batch_size, name=name
        )
        self.token_ids([""])  # drops padding settings the tokenizer arrived with, before any thread races

    @classmethod
    def load(
        cls,
        name_or_path: str,
        *,
        device: str | None = "auto",
        dtype: str | torch.dtype | None = "auto",
        **kwargs: Any,
    ) -> tuple[GenerationEngine, str]:
        """(engine, resolved path) for a packaged model name, a local folder or a hub id."""
        dev = select_device(device)
        model, tokenizer, path = load_causal_lm(name_or_path, device=dev, dtype=select_dtype(dtype, dev))
        return cls(model, tokenizer, **kwargs), path

    @property
    def max_batch_size(self) -> int:
        """The largest micro-batch :meth:`submit` callers are grouped into."""
        return self._batcher.max_batch_size

    @max_batch_size.setter
    def max_batch_size(self, value: int) -> None:
        self._batcher.max_batch_size = value

    @property
    def max_positions(self) -> int | None:
        """The model's context length in tokens, when its config says."""
        limit = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return int(limit) if limit else None

    @property
    def stop_ids(self) -> set[int]:
        """Token ids that end a sequence: the generation config's EOS ids and the tokenizer's EOS."""
        ids = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        found = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            found.add(self.tokenizer.eos_token_id)
        return found

    # ------------------------------------------------------------------ text
    def format_chat(self, messages: Messages, *, plain: Callable[[Messages], str] = plain_chat_text) -> str:
        """The model's input for a chat, ready for generation: its chat template, else ``plain(messages)``.

        A template that refuses the messages (e.g. strict user/assistant alternation) gets them with same-role
        runs merged and the system text folded into the first user turn.
        """
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            return plain(messages)
        try:
            return tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        except Exception:
            return tok.apply_chat_template(merge_roles(messages), tokenize=False, add_generation_prompt=True)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens added, no padding)."""
        with self._encode_lock:
            return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def _encode_batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded (input_ids, attention_mask) on the model's device."""
        import torch

        rows = self.token_ids(texts)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return ids.to(self.model.device), mask.to(self.model.device)

    # ------------------------------------------------------------------ generation
    @overload
    def generate(
        self,
        texts: Sequence[str],
        settings: GenerationSettings | GenerationDefaults,
        num_return_sequences: int = 1,
        *,
        max_rows: int | None = None,
        return_exceptions: Literal[False] = False,
    ) -> list[list[Generation]]: ...

    @overload
    def generate(
        self,
        texts: Sequence[str],
        settings: GenerationSettings | GenerationDefaults,
        num_return_sequences: int = 1,
        *,
        max_rows: int | None = None,
        return_exceptions: Literal[True],
    ) -> list[list[Generation] | Exception]: ...

    def generate(
        self,
        texts: Sequence[str],
        settings: GenerationSettings | GenerationDefaults,
        num_return_sequences: int = 1,
        *,
        max_rows: int | None = None,
        return_exceptions: bool = False,
    ) -> list[list[Generation]] | list[list[Generation] | Exception]:
        """Per text (already formatted), its ``num_return_sequences`` generations, in order.

        Texts are grouped into ``generate`` calls by length so that few rows are padded far (see
        :func:`~alignpro_plugins.batching.plan_batches`), at most ``max_rows`` texts a call. With
        ``return_exceptions`` a failing call fails only its own texts (their entry is the exception; the
        other calls still run) instead of raising.
        """
        if not isinstance(settings, GenerationSettings):
            settings = GenerationSettings.from_defaults(settings)
        if not texts:
            return []
        results: list[list[Generation] | Exception] = [[] for _ in texts]
        try:
            lengths = [len(ids) for ids in self.token_ids(texts)]
            plan = plan_batches(
                lengths,
                new_tokens=settings.max_new_tokens,
                max_rows=max_rows,
                rows_per_item=num_return_sequences,
            )
        except Exception as exc:  # e.g. the tokenizer refused a text: every text fails
            if not return_exceptions:
                raise
            failed: list[list[Generation] | Exception] = [exc for _ in texts]
            return failed
        for idx in plan:
            rows: list[list[Generation] | Exception]
            try:
                rows = list(self.generate_call([texts[i] for i in idx], settings, num_return_sequences))
                if len(rows) != len(idx):
                    raise RuntimeError(f"generate returned {len(rows)} rows for {len(idx)} queries")
            except Exception as exc:  # the other calls' generations still count
                if not return_exceptions:
                    raise
                rows = [exc for _ in idx]
            for i, row in zip(idx, rows, strict=True):
                results[i] = row
        return results

    def generate_call(
        self, texts: Sequence[str], settings: GenerationSettings, num_return_sequences: int = 1
    ) -> list[list[Generation]]:
        """One batched ``generate`` call on formatted texts, unplanned."""
        tok = self.tokenizer
        input_ids, attention_mask = self._encode_batch(texts)
        prompt_len = input_ids.shape[1]
        stop = tuple(s for s in settings.stop if s)
        kwargs = settings.generate_kwargs()
        if stop:
            kwargs["stopping_criteria"] = _stopping_criteria(tok, stop, prompt_len, None)
        out = self._run(
            input_ids, attention_mask, settings, num_return_sequences=num_return_sequences, **kwargs
        )
        stop_ids, pad = self.stop_ids, tok.pad_token_id
        rows: list[list[Generation]] = []
        for i, new in enumerate(out[:, prompt_len:].tolist()):
            end = next((j + 1 for j, t in enumerate(new) if t in stop_ids), None)
            ids = new if end is None else new[:end]
            while end is None and ids and ids[-1] == pad:  # a row stopped by a stop string is padded after
                ids = ids[:-1]
            text, stopped = cut_at_stop(tok.decode(ids, skip_special_tokens=True), stop)
            n_in = int(attention_mask[i // num_return_sequences].sum())
            if i % num_return_sequences == 0:
                rows.append([])
            rows[-1].append(Generation(text, end is not None or stopped, n_in, len(ids)))
        return rows

    def _run(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        settings: GenerationSettings,
        **kwargs: Any,
    ) -> torch.Tensor:
        import torch

        with self._generate_lock, torch.inference_mode():
            model = self.model
            was_training = model.training
            model.eval()
            try:
                if settings.do_sample and settings.seed is not None:
                    torch.manual_seed(settings.seed)
                return model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=sorted(self.stop_ids),
                    use_cache=True,
                    **kwargs,
                )
            finally:
                if was_training:
                    model.train()

    # ------------------------------------------------------------------ micro-batching
    def submit(self, text: str, settings: GenerationSettings) -> Future[Generation]:
        """Queue one formatted text; concurrent callers with equal settings share ``generate`` calls."""
        return self._batcher.submit(settings, text)

    def _generate_queued(self, settings: Any, texts: list[str]) -> list[Generation]:
        return [row[0] for row in self.generate(texts, settings)]

    # ------------------------------------------------------------------ streaming
    def stream(self, text: str, settings: GenerationSettings) -> Iterator[str | Generation]:
        """Yield text pieces of one formatted text as they are generated, then one :class:`Generation`.

        Closing the iterator early stops the generation at its next token.
        """
        from transformers import TextIteratorStreamer

        tok = self.tokenizer
        stop_ids = self.stop_ids

        class CountingStreamer(TextIteratorStreamer):
            n_generated = 0
            last_token: int | None = None

            def put(self, value: Any) -> None:
                if not (self.skip_prompt and self.next_tokens_are_prompt):
                    flat = value.reshape(-1).tolist()
                    self.n_generated += len(flat)
                    self.last_token = flat[-1] if flat else self.last_token
                super().put(value)

        input_ids, attention_mask = self._encode_batch([text])
        n_in = int(input_ids.shape[1])
        streamer = CountingStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        stop = [s for s in settings.stop if s]
        criteria = _stopping_criteria(tok, stop, n_in, cancel)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                self._run(
                    input_ids,
                    attention_mask,
                    settings,
                    streamer=streamer,
                    stopping_criteria=criteria,
                    **settings.generate_kwargs(),
                )
            except BaseException as exc:  # surface in the consumer instead of hanging it
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, name="alignpro-engine-stream", daemon=True)
        thread.start()
        hold = max((len(s) for s in stop), default=1) - 1  # chars that may be the start of a stop string
        pending, emitted = "", ""
        stopped = False
        try:
            for piece in streamer:
                pending += piece
                if stop:
                    cut, stopped = cut_at_stop(pending, stop)
                    if stopped:
                        if cut:
                            emitted += cut
                            yield cut
                        pending = ""
                        cancel.set()
                        break
                    safe = len(pending) - hold
                    if safe > 0:
                        emitted += pending[:safe]
                        yield pending[:safe]
                        pending = pending[safe:]
                elif pending:
                    emitted += pending
                    yield pending
                    pending = ""
            if pending and not stopped:
                emitted += pending
                yield pending
        finally:
            cancel.set()  # consumer stopped early: end the generation at the next token
            thread.join()
        if errors:
            raise errors[0]
        ended = stopped or streamer.last_token in stop_ids or streamer.n_generated < settings.max_new_tokens
        yield Generation(emitted, ended, n_in, streamer.n_generated)

    def close(self) -> None:
        """Stop the micro-batching worker (it restarts on the next :meth:`submit`)."""
        self._batcher.close()
