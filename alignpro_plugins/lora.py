"""A saved PEFT LoRA adapter applied for inference without peft (peft pulls in accelerate, a training extra).

:func:`apply_lora` reads a PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) and
wraps each targeted ``nn.Linear`` (or transformers' ``Conv1D``) of a transformers model in a
:class:`LoraLinear` that computes what peft's ``lora.Linear.forward`` computes in eval mode, operation for
operation: ``base(x) + lora_B(lora_A(x)) * scaling``, the LoRA weights in the base layer's dtype (float32 for a
float16 / bfloat16 base, as peft upcasts them), the sum cast back to the base output's dtype. So greedy outputs
are bit-identical to ``PeftModel.from_pretrained(model, folder)``. Modules are matched as peft matches them
(``target_modules`` list / regex / ``all-linear``, ``exclude_modules``, ``layers_to_transform`` /
``layers_pattern``), and ``scaling`` is ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``) with
``rank_pattern`` / ``alpha_pattern`` per module.

Anything beyond plain LoRA on linear layers (DoRA and the other variants, ``modules_to_save``, trained biases,
embedding or convolution LoRA, other PEFT methods, initialisations that change the base weights) is refused
with an :class:`UnsupportedAdapterError` naming the field; peft (the ``[train]`` extra) loads those.
:func:`save_lora` writes the adapter back in PEFT's format, and :func:`merge_lora` merges it into the base
weights as peft's ``merge_and_unload`` does.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
from torch import nn

from alignpro_plugins.artifact import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ArtifactError

# PEFT's saved keys: "base_model.model." + the module's name in the transformers model + ".lora_A.weight".
KEY_PREFIX = "base_model.model."
_PEFT = "pip install 'alignpro-plugins[train]'"
_ALL_LINEAR = "all-linear"
_EMBEDDING_NAMES = ("embed_tokens", "lm_head")  # peft's EMBEDDING_LAYER_NAMES

# Fields that say nothing about the computation (or only matter together with a refused one).
_IGNORED = {
    "task_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "lora_dropout",  # dropout is the identity at inference
    "fan_in_fan_out",  # follows the layer type, as in peft: Conv1D stores its weight transposed
    "runtime_config",
    "megatron_core",
    "qalora_group_size",
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
}
_IMPLEMENTED = {
    "peft_type",
    "r",
    "lora_alpha",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "bias",
    "init_lora_weights",
}
# Initialisations that only set lora_A / lora_B (the saved weights replace them); the others (PiSSA, OLoRA,
# CorDA, LoftQ, ...) also change the base weights when peft loads the adapter.
_PLAIN_INITS = (True, False, "gaussian")
# Features by field: what the field turns on, for the refusal message.
_FEATURES = {
    "use_dora": "DoRA",
    "modules_to_save": "fully trained extra modules",
    "lora_bias": "a trained bias on lora_B",
    "target_parameters": "LoRA on parameters (not modules)",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "replicated layers",
    "megatron_config": "Megatron parallel layers",
    "use_qalora": "QA-LoRA",
    "use_bdlora": "block-diagonal LoRA",
    "alora_invocation_tokens": "activated LoRA",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "ensure_weight_tying": "tied adapter weights",
}


class AdapterError(ArtifactError):
    """An adapter folder that cannot be applied as it is; the message names the folder and the problem."""


class UnsupportedAdapterError(AdapterError):
    """The adapter uses a PEFT feature this loader does not implement (peft, the ``[train]`` extra, does)."""


def _unsupported(folder: Path, field: str, value: Any, what: str) -> UnsupportedAdapterError:
    return UnsupportedAdapterError(
        f"{folder}/{ADAPTER_CONFIG} sets {field}: {json.dumps(value, default=str)} ({what}); alignpro's "
        f"built-in LoRA loader applies plain LoRA on linear layers only. Load this adapter with peft: install it "
        f"with {_PEFT} and use PeftModel.from_pretrained(model, folder)"
    )


def _empty(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


@dataclass(frozen=True)
class LoraSettings:
    """What decides a plain LoRA adapter's computation, read from ``adapter_config.json``."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]

    @classmethod
    def from_config(cls, config: Mapping[str, Any], folder: Path) -> LoraSettings:
        """The settings, or :class:`UnsupportedAdapterError` naming the first field it does not implement."""
        peft_type = config.get("peft_type")
        if peft_type != "LORA":
            raise _unsupported(folder, "peft_type", peft_type, "a PEFT method other than LoRA")
        for field, what in _FEATURES.items():
            if not _empty(config.get(field)):
                raise _unsupported(folder, field, config[field], what)
        if config.get("bias", "none") != "none":
            raise _unsupported(folder, "bias", config["bias"], "trained biases of the base model")
        init = config.get("init_lora_weights", True)
        if init not in _PLAIN_INITS:
            raise _unsupported(
                folder, "init_lora_weights", init, "an initialisation that changes the base weights"
            )
        for field, value in config.items():
            if (
                field not in _IMPLEMENTED
                and field not in _IGNORED
                and field not in _FEATURES
                and not _empty(value)
            ):
                raise _unsupported(folder, field, value, "a field this loader does not know")
        r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
        if not _positive_int(r) or not _number(alpha):
            raise AdapterError(
                f"{folder}/{ADAPTER_CONFIG}: r must be an integer >= 1 and lora_alpha a number, got r={r!r}, "
                f"lora_alpha={alpha!r}"
            )
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        if not (
            isinstance(rank_pattern, dict)
            and all(_positive_int(v) for v in rank_pattern.values())
            and isinstance(alpha_pattern, dict)
            and all(_number(v) for v in alpha_pattern.values())
        ):
            raise AdapterError(
                f"{folder}/{ADAPTER_CONFIG}: rank_pattern must map module patterns to integers >= 1 and "
                f"alpha_pattern to numbers, got {rank_pattern!r} and {alpha_pattern!r}"
            )
        return cls(r, alpha, bool(config.get("use_rslora", False)), rank_pattern, alpha_pattern)

    def rank_and_scaling(self, name: str) -> tuple[int, float]:
        """The module's rank and scaling, the first matching ``rank_pattern`` / ``alpha_pattern`` key winning."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, name), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, name), self.lora_alpha)
        return r, (alpha / math.sqrt(r) if self.use_rslora else alpha / r)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pattern_key(patterns: Mapping[str, Any], name: str) -> str:
    # peft.utils.other.get_pattern_key
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return name


# ---------------------------------------------------------------------------------------------- reading
def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` as a dict, or an :class:`AdapterError` saying why it is not a PEFT config."""
    path = Path(folder) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path} is not a valid PEFT adapter config: {exc}") from exc
    if not isinstance(config, dict) or "peft_type" not in config:
        raise AdapterError(
            f"{path} is not a valid PEFT adapter config: no peft_type (a JSON object is expected)"
        )
    return config


def saved_keys(folder: str | Path) -> set[str]:
    """The tensor names in ``adapter_model.safetensors`` (its header only is read)."""
    from safetensors import safe_open

    with safe_open(str(Path(folder) / ADAPTER_WEIGHTS), framework="pt") as fh:
        return set(fh.keys())


def lora_keys(module_names: Iterable[str]) -> set[str]:
    """The keys PEFT saves for plain LoRA on these modules."""
    return {f"{KEY_PREFIX}{name}.lora_{ab}.weight" for name in module_names for ab in "AB"}


def _linear_classes() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def target_module_names(model: nn.Module, config: Mapping[str, Any]) -> list[str]:
    """The modules of ``model`` the adapter targets, matched as peft matches them (any module type)."""
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets.lower() == _ALL_LINEAR:
        targets = _all_linear(model)
    if targets is None:
        return []
    return [name for name, _ in model.named_modules() if name and _targeted(config, targets, name)]


def _all_linear(model: nn.Module) -> list[str]:
    """peft's ``all-linear``: every Linear / Conv1D but the output head."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return [n for n, m in model.named_modules() if isinstance(m, _linear_classes()) and m is not head]


def _targeted(config: Mapping[str, Any], targets: str | list[str], key: str) -> bool:
    # peft.tuners.tuners_utils.check_target_module_exists
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{e}") for e in exclude):
            return False
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    found = any(key.endswith(f".{t}") for t in targets)
    indexes = config.get("layers_to_transform")
    if not found or indexes is None or (isinstance(indexes, list) and not indexes):
        return found
    patterns = config.get("layers_pattern")
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == indexes if isinstance(indexes, int) else index in indexes


def check_weights_fit(
    folder: str | Path, config: Mapping[str, Any], saved: set[str], expected: set[str]
) -> None:
    """The saved weights load one for one into the adapter modules the config creates."""
    unused, untrained = sorted(saved - expected), sorted(expected - saved)
    if not (unused or untrained):
        return
    details = []
    if unused:
        details.append(f"{len(unused)} saved weight(s) fit no adapter module (e.g. {unused[0]})")
    if untrained:
        details.append(f"{len(untrained)} adapter weight(s) have no saved value (e.g. {untrained[0]})")
    raise AdapterError(
        f"The adapter in {folder} does not load as it was trained: {'; '.join(details)}. Its {ADAPTER_CONFIG} "
        f"(target_modules {shown(config.get('target_modules'))}) does not match {ADAPTER_WEIGHTS}: use the "
        "config saved with these weights"
    )


def check_targets_exist(folder: str | Path, config: Mapping[str, Any], names: list[str]) -> None:
    if not names:
        raise AdapterError(
            f"{folder}/{ADAPTER_CONFIG} targets modules {shown(config.get('target_modules'))}, which match no "
            "module of the base model: the adapter would change nothing. Use the adapter_config.json saved with "
            "the adapter, or load it onto the base model it was trained on"
        )


def shown(targets: Any) -> str:
    return repr(sorted(targets)) if isinstance(targets, (set, list, tuple)) else repr(targets)


# ---------------------------------------------------------------------------------------------- the layer
class LoraLinear(nn.Module):
    """A linear layer plus its LoRA update, as peft's ``lora.Linear`` computes it in eval mode."""

    def __init__(self, base_layer: nn.Module, lora_A: nn.Linear, lora_B: nn.Linear, scaling: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_A = lora_A
        self.lora_B = lora_B
        self.scaling = scaling
        # Conv1D keeps its weight as (in, out): the merged update is transposed (peft's fan_in_fan_out).
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        if x.dtype != self.lora_A.weight.dtype:
            x = x.to(dtype=self.lora_A.weight.dtype)
        result = result + self.lora_B(self.lora_A(x)) * self.scaling
        return result.to(result_dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update merging adds to the base weight (peft's ``get_delta_weight``)."""
        weight_a, weight_b = self.lora_A.weight, self.lora_B.weight
        dtype = weight_b.dtype
        # peft multiplies half-precision CPU weights in float32 (slow half matmuls on CPU), then casts back.
        upcast = weight_b.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
        if upcast:
            weight_a, weight_b = weight_a.float(), weight_b.float()
        delta = weight_b @ weight_a
        delta = (delta.T if self.fan_in_fan_out else delta) * self.scaling
        return delta.to(dtype) if upcast else delta


@dataclass
class AppliedLora:
    """Kept on a model :func:`apply_lora` adapted, so :func:`save_lora` can write the adapter back."""

    config: dict[str, Any]
    module_names: list[str]
    saved_base_layers: list[
        str
    ]  # embedding layers whose base weight the adapter carries (as peft saves them)


_MARK = "alignpro_lora"
ModelT = TypeVar("ModelT", bound=nn.Module)


def applied_lora(model: Any) -> AppliedLora | None:
    """What :func:`apply_lora` applied to ``model``, or None."""
    return getattr(model, _MARK, None)


def _adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    # peft creates the LoRA weights in the base layer's dtype, then upcasts float16 / bfloat16 / float8 to float32.
    if base_dtype.is_floating_point and base_dtype.itemsize < 4:
        return torch.float32
    return base_dtype


def apply_lora(model: ModelT, folder: str | Path) -> ModelT:
    """Apply the LoRA adapter in ``folder`` to ``model`` (in place, put in eval mode) and return it.

    Refuses (:class:`AdapterError`) an adapter whose targets match nothing or whose saved weights do not fit
    the modules it targets one for one, and (:class:`UnsupportedAdapterError`) one using a PEFT feature beyond
    plain LoRA on linear layers.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if applied_lora(model) is not None:
        raise AdapterError(f"the model already carries a LoRA adapter; load {folder} onto a fresh base model")
    config = read_adapter_config(folder)
    settings = LoraSettings.from_config(config, folder)
    names = target_module_names(model, config)
    check_targets_exist(folder, config, names)
    modules = dict(model.named_modules())
    for name in names:
        if not isinstance(modules[name], _linear_classes()):
            raise _unsupported(
                folder,
                "target_modules",
                config.get("target_modules"),
                f"it matches {name}, a {type(modules[name]).__name__}: LoRA on layers other than linear ones",
            )
    saved = saved_keys(folder)
    # peft also saves the base weight of a targeted embedding layer (lm_head, embed_tokens) and loads it back.
    base_copies = {
        name: key
        for name in names
        if name.rpartition(".")[2] in _EMBEDDING_NAMES
        and (key := f"{KEY_PREFIX}{name}.base_layer.weight") in saved
    }
    check_weights_fit(folder, config, saved, lora_keys(names) | set(base_copies.values()))
    weights = load_file(str(folder / ADAPTER_WEIGHTS))
    layers = {name: _lora_linear(folder, name, modules[name], weights, settings) for name in names}
    for name, key in base_copies.items():
        if weights[key].shape != cast(torch.Tensor, modules[name].weight).shape:
            raise AdapterError(
                f"The adapter in {folder} saves {name} with shape {tuple(weights[key].shape)}, but the base "
                f"model's has {tuple(cast(torch.Tensor, modules[name].weight).shape)} (a resized vocabulary?)"
            )
    # The model changes only once every layer was built: a refusal leaves it as it was.
    with torch.no_grad():
        for name, key in base_copies.items():
            cast(torch.Tensor, modules[name].weight).copy_(weights[key])
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    setattr(model, _MARK, AppliedLora(config, names, sorted(base_copies)))
    return model.eval()


def _lora_linear(
    folder: Path, name: str, base: nn.Module, weights: Mapping[str, torch.Tensor], settings: LoraSettings
) -> LoraLinear:
    r, scaling = settings.rank_and_scaling(name)
    # Conv1D stores (in_features, out_features).
    base_weight = cast(torch.Tensor, base.weight)
    out_f, in_f = base_weight.shape if isinstance(base, nn.Linear) else base_weight.shape[::-1]
    weight_a = weights[f"{KEY_PREFIX}{name}.lora_A.weight"]
    weight_b = weights[f"{KEY_PREFIX}{name}.lora_B.weight"]
    if tuple(weight_a.shape) != (r, in_f) or tuple(weight_b.shape) != (out_f, r):
        raise AdapterError(
            f"The adapter in {folder} does not fit {name}: its saved LoRA weights have shapes "
            f"{tuple(weight_a.shape)} and {tuple(weight_b.shape)}, but rank r={r} on a layer of "
            f"{in_f} -> {out_f} features needs ({r}, {in_f}) and ({out_f}, {r}). Use the adapter_config.json "
            "saved with these weights"
        )
    dtype, device = _adapter_dtype(base_weight.dtype), base_weight.device
    lora_a = nn.Linear(in_f, r, bias=False, device=device, dtype=dtype)
    lora_b = nn.Linear(r, out_f, bias=False, device=device, dtype=dtype)
    with torch.no_grad():
        lora_a.weight.copy_(weight_a)
        lora_b.weight.copy_(weight_b)
    lora_a.requires_grad_(False)
    lora_b.requires_grad_(False)
    return LoraLinear(base, lora_a, lora_b, scaling)


def lora_state_dict(model: nn.Module, saved_base_layers: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The LoRA weights (and the base weights of ``saved_base_layers``) under PEFT's saved names."""
    with_base = set(saved_base_layers)
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            state[f"{KEY_PREFIX}{name}.lora_A.weight"] = module.lora_A.weight.detach().contiguous()
            state[f"{KEY_PREFIX}{name}.lora_B.weight"] = module.lora_B.weight.detach().contiguous()
            if name in with_base:
                base_weight = cast(torch.Tensor, module.base_layer.weight)
                state[f"{KEY_PREFIX}{name}.base_layer.weight"] = base_weight.detach().contiguous()
    return state


def save_lora(model: nn.Module, folder: str | Path, *, base_model_name_or_path: str | None = None) -> None:
    """Write the adapter :func:`apply_lora` applied as a PEFT adapter folder (what peft loads too)."""
    from safetensors.torch import save_file

    applied = applied_lora(model)
    if applied is None:
        raise ValueError("the model carries no adapter applied by alignpro_plugins.lora.apply_lora")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(model, applied.saved_base_layers)
    save_file(state, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {**applied.config, "inference_mode": True}
    if base_model_name_or_path is not None:
        config["base_model_name_or_path"] = base_model_name_or_path
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def merge_lora(model: ModelT) -> ModelT:
    """Add each LoRA update to its base weight and unwrap the layers, as peft's ``merge_and_unload`` does."""
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLinear):
                cast(torch.Tensor, module.base_layer.weight).data += module.delta_weight()
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, module.base_layer)
    if applied_lora(model) is not None:
        delattr(model, _MARK)
    return model


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "AdapterError",
    "AppliedLora",
    "LoraLinear",
    "LoraSettings",
    "UnsupportedAdapterError",
    "applied_lora",
    "apply_lora",
    "check_targets_exist",
    "check_weights_fit",
    "lora_keys",
    "lora_state_dict",
    "merge_lora",
    "read_adapter_config",
    "save_lora",
    "saved_keys",
    "target_module_names",
]
