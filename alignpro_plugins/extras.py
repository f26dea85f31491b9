"""Optional dependencies: the core installs what using a prompter needs; training, evaluation plots, GGUF
reading, serving and the framework adapters are extras. A feature whose extra is missing fails with the exact
install command instead of a bare ``ModuleNotFoundError``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> (the distribution that provides it, the extra that installs it)
PROVIDED_BY: dict[str, tuple[str, str]] = {
    "trl": ("trl", "train"),
    "peft": ("peft", "train"),
    "accelerate": ("accelerate", "train"),
    "datasets": ("datasets", "train"),
    "matplotlib": ("matplotlib", "eval"),
    "gguf": ("gguf", "gguf"),
    "fastapi": ("fastapi", "serve"),
    "uvicorn": ("uvicorn", "serve"),
    "httpx": ("httpx", "serve"),
    "langchain_core": ("langchain-core", "langchain"),
    "dspy": ("dspy", "dspy"),
}


class MissingExtraError(ImportError):
    """A feature needs an optional dependency that is not installed; the message gives the install command."""


def install_command(extra: str) -> str:
    return f"pip install 'alignpro-plugins[{extra}]'"


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` for ``feature``, or raise :class:`MissingExtraError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        if top not in PROVIDED_BY or (exc.name or "").split(".")[0] != top:
            raise  # a broken install of something else: its own message is the useful one
        dist, extra = PROVIDED_BY[top]
        raise MissingExtraError(
            f"{feature} needs {dist}, which is not installed. Install it with: {install_command(extra)} "
            f"(or {install_command('all')} for everything)"
        ) from exc


__all__ = ["MissingExtraError", "PROVIDED_BY", "install_command", "require"]
