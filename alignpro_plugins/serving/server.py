"""Build the proxy from a :class:`ServeConfig` and run it under uvicorn."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from alignpro_plugins.extras import require
from alignpro_plugins.serving.config import ServeConfig

if TYPE_CHECKING:
    from fastapi import FastAPI

logger = logging.getLogger("alignpro_plugins.serving")


def key_from_env(name: str | None, what: str) -> str | None:
    if name is None:
        return None
    value = os.environ.get(name, "")
    if not value:
        logger.warning("%s=%r is not set or empty: no key is sent from it", what, name)
    return value or None


def load_prompter(config: ServeConfig) -> Any:
    """The local prompter, or the remote one generating on ``config.prompter_endpoint``."""
    if config.prompter_endpoint is not None:
        from alignpro_plugins.serving.remote_prompter import remote_prompter

        return remote_prompter(
            config.prompter,
            config.prompter_endpoint,
            str(config.prompter_model),
            api_key=key_from_env(config.prompter_api_key_env, "prompter_api_key_env"),
            timeout=config.timeout,
        )
    from alignpro_plugins.prompter import Prompter

    return Prompter.from_pretrained(
        config.prompter, base_model=config.prompter_base, max_batch_size=config.max_batch_size
    )


def build_app(config: ServeConfig) -> FastAPI:
    """Load the prompter and connect the upstream (the upstream URL is checked before the prompter loads)."""
    from alignpro_plugins.serving.app import create_app
    from alignpro_plugins.serving.upstream import Upstream

    api_key = key_from_env(config.upstream_api_key_env, "upstream_api_key_env")
    upstream = Upstream(config.upstream, api_key=api_key, timeout=config.timeout)
    prompter = load_prompter(config)
    if config.mode is not None and config.mode not in prompter.manifest.instructions:
        raise ValueError(
            f"mode {config.mode!r} has no instruction template in {config.prompter}/alignpro.json; it has "
            f"{sorted(prompter.manifest.instructions)}"
        )
    gate = None
    if config.gate_reward is not None:
        from alignpro_plugins.gate import RetryGate

        gate = (
            RetryGate.rerank(config.gate_reward)
            if config.rerank
            else RetryGate(config.gate_reward, float(config.gate_threshold))  # type: ignore[arg-type]
        )
    return create_app(prompter, upstream, mode=config.mode, upstream_model=config.upstream_model, gate=gate)


def serve(config: ServeConfig) -> None:
    """Run the proxy until interrupted."""
    uvicorn = require("uvicorn", "alignpro serve")
    app = build_app(config)
    print(f"alignpro proxy on http://{config.host}:{config.port}/v1 -> {app.state.upstream_url}", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
