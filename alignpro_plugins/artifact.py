"""Checks that a prompter artifact folder is what its ``alignpro.json`` says, before and after loading it.

``Prompter.from_pretrained`` runs them. Each refusal is an :class:`ArtifactError` that names the folder, what
is wrong and how to fix it. What is refused:

* a weights file that is not safetensors (``adapter_model.bin``, ``*.pt``, ``*.pkl``, ...): only safetensors
  are ever read, and a pickle can run code;
* ``has_adapter: false`` on a folder that holds an adapter or records training stages (the trained adapter
  would be silently left out and the bare base model would run), and ``has_adapter: true`` without one;
* an adapter whose base model cannot be verified (no ``base_model_hash``, or a base whose weights cannot be
  hashed here) unless the caller says ``allow_unverified_base=True``, and one whose base has other weights;
* an adapter whose ``target_modules`` match no module of the base model, or whose weights do not load one for
  one into the modules it creates (a no-op or partly random adapter);
* a similarity model the guard would need that cannot be found.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

from alignpro_plugins.manifest import MANIFEST_NAME, Manifest, model_weights_hash

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Weight and array formats other than safetensors; most can hold a pickle (and so run code when loaded).
UNSAFE_SUFFIXES = (
    ".bin",
    ".pt",
    ".pth",
    ".pkl",
    ".pickle",
    ".ckpt",
    ".joblib",
    ".npy",
    ".npz",
    ".h5",
    ".msgpack",
)
_OPT_IN = "allow_unverified_base=True (alignpro rewrite / eval: --allow-unverified-base)"


class ArtifactError(ValueError):
    """An artifact folder that is refused as it is; the message says what is wrong and how to fix it."""


class BaseModelMismatchError(ArtifactError):
    """The base model's weights differ from the ones the adapter was trained on."""


class UnverifiedBaseError(ArtifactError):
    """The adapter's base model cannot be verified (no recorded hash, or no local weights to hash)."""


def check_before_loading(
    folder: Path, manifest: Manifest, *, verify_base: bool, allow_unverified_base: bool, similarity: Any
) -> None:
    """Before any model is loaded: the folder's files agree with the manifest and hold only safetensors, and
    the similarity model the guard uses in rewrite mode exists (``similarity="default"``: the manifest's)."""
    _check_files(folder, manifest, verify_base=verify_base, allow_unverified_base=allow_unverified_base)
    if isinstance(similarity, str) and similarity == "default" and manifest.mode == "rewrite":
        if manifest.similarity_model is not None:
            check_similarity_model(manifest.similarity_model)


def _check_files(folder: Path, manifest: Manifest, *, verify_base: bool, allow_unverified_base: bool) -> None:
    unsafe = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in UNSAFE_SUFFIXES)
    if unsafe:
        raise ArtifactError(
            f"{folder} holds {', '.join(unsafe)}: prompter artifacts carry safetensors weights only (other "
            "formats can hold a pickle, which can run code when loaded). Delete the file(s), or convert an "
            "adapter with: PeftModel.from_pretrained(base, dir).save_pretrained(dir, safe_serialization=True)"
        )
    has_config = (folder / ADAPTER_CONFIG).is_file()
    has_weights = (folder / ADAPTER_WEIGHTS).is_file()
    if manifest.has_adapter:
        if not (has_config and has_weights):
            missing = [
                n for n, ok in ((ADAPTER_CONFIG, has_config), (ADAPTER_WEIGHTS, has_weights)) if not ok
            ]
            raise ArtifactError(
                f"{folder}/{MANIFEST_NAME} says has_adapter: true, but {', '.join(missing)} is missing. Copy the "
                "whole artifact folder again, or set has_adapter: false for a zero-shot prompter"
            )
        if not manifest.base_model_hash and verify_base:
            _unverified(
                f"{folder}/{MANIFEST_NAME} records no base_model_hash, so nothing shows that "
                f"{manifest.base_model!r} is the base model this adapter was trained on",
                allow_unverified_base,
            )
        return
    # has_adapter: false is what save_pretrained writes for a zero-shot prompter: no adapter, no training.
    if has_config or has_weights:
        raise ArtifactError(
            f"{folder}/{MANIFEST_NAME} says has_adapter: false, but the folder holds an adapter "
            f"({ADAPTER_CONFIG} / {ADAPTER_WEIGHTS}), which would be silently ignored and the bare base model "
            "run instead. Set has_adapter: true to use it, or delete the adapter files for a zero-shot prompter"
        )
    stages = manifest.provenance.get("stages") or []
    if stages:
        names = [s.get("stage", "?") if isinstance(s, dict) else s for s in stages]
        raise ArtifactError(
            f"{folder}/{MANIFEST_NAME} records training stages {names} but has_adapter: false and no adapter: the "
            "trained weights are missing, so the bare base model would run. Copy the whole artifact folder "
            "again (adapter_config.json and adapter_model.safetensors)"
        )


def verify_base_model(
    folder: Path,
    manifest: Manifest,
    base: str,
    resolved: str,
    *,
    verify_base: bool,
    allow_unverified_base: bool,
) -> None:
    """After the base model is resolved: its weights are the ones the manifest records."""
    if not (verify_base and manifest.base_model_hash):
        return  # a missing hash was dealt with before loading; verify_base=False is the caller's choice
    actual = model_weights_hash(resolved)
    if actual is None:
        if manifest.has_adapter:
            _unverified(
                f"the base model {base!r} of the prompter in {folder} has no local weights to check against "
                f"the recorded {manifest.base_model_hash} (neither a folder nor in the Hugging Face cache)",
                allow_unverified_base,
            )
        return
    if actual != manifest.base_model_hash:
        raise BaseModelMismatchError(
            f"The prompter in {folder} was trained on base model {manifest.base_model!r} with weights "
            f"{manifest.base_model_hash}, but {base!r} resolves to weights {actual}. Pass the right "
            "base_model=..., or verify_base=False if you know the weights are compatible."
        )


def _unverified(problem: str, allowed: bool) -> None:
    if not allowed:
        raise UnverifiedBaseError(
            f"Refusing to load: {problem}. An adapter on other base weights gives wrong rewrites without any "
            f"error. Re-save the artifact with its base model's hash (Prompter.from_pretrained(dir, "
            f"{_OPT_IN}).save_pretrained(dir) after checking the base), or pass {_OPT_IN} to load it anyway."
        )
    message = (
        f"LOADING AN UNVERIFIED BASE MODEL: {problem}; loading anyway because allow_unverified_base=True"
    )
    logger.warning(message)
    warnings.warn(message, UserWarning, stacklevel=3)


def load_adapter(model: Any, folder: Path, *, is_trainable: bool) -> Any:
    """The base model with the folder's LoRA adapter, refused when the adapter would not do what was trained."""
    from peft import PeftConfig, PeftModel, get_peft_model_state_dict
    from peft.tuners.tuners_utils import check_target_module_exists
    from safetensors import safe_open

    try:
        config = PeftConfig.from_pretrained(str(folder))
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{folder}/{ADAPTER_CONFIG} is not a valid PEFT adapter config: {exc}") from exc
    targets = getattr(config, "target_modules", None)
    if targets is not None and not any(
        check_target_module_exists(config, name) for name, _ in model.named_modules()
    ):
        raise ArtifactError(
            f"{folder}/{ADAPTER_CONFIG} targets modules {_shown(targets)}, which match no module of the base "
            "model: the adapter would change nothing. Use the adapter_config.json saved with the adapter, or "
            "load it onto the base model it was trained on"
        )
    with safe_open(str(folder / ADAPTER_WEIGHTS), framework="pt") as fh:
        saved = set(fh.keys())
    model = PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)
    loaded = set(get_peft_model_state_dict(model).keys())
    unused, untrained = sorted(saved - loaded), sorted(loaded - saved)
    if unused or untrained:
        details = []
        if unused:
            details.append(f"{len(unused)} saved weight(s) fit no adapter module (e.g. {unused[0]})")
        if untrained:
            details.append(f"{len(untrained)} adapter weight(s) have no saved value (e.g. {untrained[0]})")
        raise ArtifactError(
            f"The adapter in {folder} does not load as it was trained: {'; '.join(details)}. Its "
            f"{ADAPTER_CONFIG} (target_modules {_shown(targets)}) does not match {ADAPTER_WEIGHTS}: use the "
            "config saved with these weights"
        )
    if not is_trainable:
        model.eval()
    return model


def check_similarity_model(name: str) -> None:
    """The guard's similarity model can be found (its config loads; the weights load on first use)."""
    from transformers import AutoConfig

    from alignpro_plugins.models import ModelNotAvailableError, resolve_model

    try:
        AutoConfig.from_pretrained(resolve_model(name))
    except (OSError, ValueError, ModelNotAvailableError) as exc:
        raise ArtifactError(
            f"similarity_model {name!r} (the intent guard's similarity model in rewrite mode) cannot be found: "
            f"{str(exc).splitlines()[0]}. Accepted: a packaged name (alignpro models), a model folder or a "
            "hub id in the local cache; or set similarity_model: null to skip the similarity check"
        ) from exc


def _shown(targets: Any) -> str:
    return repr(sorted(targets)) if isinstance(targets, (set, list, tuple)) else repr(targets)
