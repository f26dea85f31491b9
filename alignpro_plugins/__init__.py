"""alignpro-plugins: align a frozen LLM by learning to rewrite its prompts (Align-Pro).

Core objects are importable from here; the LangChain and DSPy adapters live in ``alignpro_plugins.langchain``
and ``alignpro_plugins.dspy`` and import their frameworks only when used.
"""

from alignpro_plugins.gate import RetryGate
from alignpro_plugins.models import resolve_model
from alignpro_plugins.prompter import BaseModelMismatchError, Prompter, RewriteResult

__version__ = "0.1.0"
__all__ = ["BaseModelMismatchError", "Prompter", "RetryGate", "RewriteResult", "__version__", "resolve_model"]
