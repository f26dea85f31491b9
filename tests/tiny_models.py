"""Re-export of the tiny model builders (they live in the package so examples' --smoke mode can use them)."""

from alignpro_plugins.testing import (  # noqa: F401
    CHAT_TEMPLATE,
    build_tiny_causal_lm,
    build_tiny_encoder,
    tiny_byte_tokenizer,
)
