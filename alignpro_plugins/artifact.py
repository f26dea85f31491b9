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
  one into the modules it creates (a no-op or partly random adapter), and, for inference, an adapter that is
  not plain LoRA on linear layers (:mod:`alignpro_plugins.lora` names the field; peft loads those);
* a similarity model the guard would need that cannot be found.

It also locates an artifact (a folder or a hub id), resolves the base model it names, and writes an adapter
under a portable base model name.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from alignpro_plugins.extras import require
from alignpro_plugins.manifest import MANIFEST_NAME, Manifest, model_weights_hash, portable_base_name

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
    """The base model with the folder's LoRA adapter, refused when the adapter would not do what was trained.

    For inference the adapter is applied by :mod:`alignpro_plugins.lora` (no peft needed); to train it further
    (``is_trainable=True``) it is loaded with peft, which the ``[train]`` extra installs. Either way, targets
    that match no module and saved weights that do not fit the adapter modules one for one are refused (an
    :class:`ArtifactError`).
    """
    from alignpro_plugins import lora

    if not is_trainable:
        return lora.apply_lora(model, folder)
    peft = require("peft", "Loading a prompter to train it further (is_trainable=True)")
    config = lora.read_adapter_config(folder)
    if config.get("target_modules") is not None:  # peft also targets parameters (target_parameters)
        lora.check_targets_exist(folder, config, lora.target_module_names(model, config))
    saved = lora.saved_keys(folder)
    model = peft.PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    lora.check_weights_fit(folder, config, saved, set(peft.get_peft_model_state_dict(model)))
    return model


def holds_adapter(model: Any) -> bool:
    """Whether ``model`` carries a LoRA adapter: a peft model, or one :func:`alignpro_plugins.lora.apply_lora`
    adapted."""
    from alignpro_plugins.lora import applied_lora

    return hasattr(model, "peft_config") or applied_lora(model) is not None


def save_adapter(model: Any, folder: Path, base_model: str) -> None:
    """Write ``model``'s adapter in PEFT's format (safetensors), naming its base model ``base_model``.

    peft would record the base model's path on this machine (in ``adapter_config.json`` and its model card);
    the portable name is written instead.
    """
    from alignpro_plugins.lora import applied_lora, save_lora

    if applied_lora(model) is not None:
        save_lora(model, folder, base_model_name_or_path=base_model)
        return
    base = model.get_base_model()
    kept = base.name_or_path, base.config._name_or_path
    try:
        # The model card's base_model and tags; peft's own config keeps the local path while saving, as its
        # check for a resized vocabulary reads the base config from there (a packaged name is no hub id).
        base.name_or_path = base.config._name_or_path = base_model
        model.save_pretrained(str(folder), safe_serialization=True)
    finally:
        base.name_or_path, base.config._name_or_path = kept
    path = folder / ADAPTER_CONFIG
    path.write_text(
        json.dumps({**json.loads(path.read_text()), "base_model_name_or_path": base_model}, indent=2)
    )


# ---------------------------------------------------------------------------------------------- locating
# What an artifact holds; a hub download fetches nothing else (no pickle is ever downloaded, let alone read).
_ARTIFACT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "chat_templates/*"]


def artifact_folder(path: str | os.PathLike[str], *, revision: str | None = None) -> Path:
    """The local folder of an artifact given as a folder, as the name of a prompter shipped in this package
    (:mod:`alignpro_plugins.prompters`; a name wins over a folder it shadows, as a packaged model's does) or as a
    Hugging Face hub id (downloaded, or taken from the local cache); a ``FileNotFoundError`` naming what was
    given and the packaged names when none works."""
    from alignpro_plugins.prompters import packaged_names_hint, packaged_prompter_folder

    folder = Path(path)
    name = str(path)
    packaged = packaged_prompter_folder(name) if isinstance(path, str) else None  # a Path means a folder
    if packaged is not None:
        return packaged
    if folder.exists():
        return folder
    if not _is_hub_id(name):
        raise FileNotFoundError(
            f"{name!r} is not a prompter artifact: there is no such folder, and it is neither the name of a "
            f"prompter shipped in this package nor a Hugging Face hub id ({packaged_names_hint()})"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=_ARTIFACT_PATTERNS))
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        why = (
            "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
            if offline
            else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        )
        raise FileNotFoundError(
            f"No prompter artifact at {name!r}: there is no such folder here, and as a Hugging Face hub id it "
            f"cannot be loaded ({why}). Pass an artifact folder, a packaged prompter's name or a hub id that is "
            f"reachable or cached ({packaged_names_hint()})"
        ) from exc


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def base_to_load(folder: Path, manifest: Manifest) -> str:
    """What to load as the base model the manifest records (packaged name, hub id or folder).

    An older artifact may record a folder of the machine it was trained on; when that folder is a packaged
    model's copy or a Hugging Face cache snapshot, its portable name is loaded instead (the weights hash is
    still checked). Any other missing folder is an error that says how to point at a copy.
    """
    recorded = Path(manifest.base_model)
    if not recorded.is_absolute() or recorded.exists():
        return manifest.base_model
    portable = portable_base_name(manifest.base_model)
    if portable != manifest.base_model:
        return portable
    # A base folder recorded on another machine; transformers would misread it as a hub id.
    raise FileNotFoundError(
        f"The prompter in {folder} needs its base model folder {manifest.base_model}, which does not "
        "exist here (was the artifact copied from another machine?). Pass the same base model with "
        "Prompter.from_pretrained(path, base_model=<name, hub id or folder>); its weights are still "
        "checked against the recorded hash."
    )


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
