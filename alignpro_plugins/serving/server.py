"""Build the proxy from a :class:`ServeConfig` and run it under uvicorn."""

from __future__ import annotations

import logging
import os

from fastapi import FastAPI

from alignpro_plugins.serving.app import create_app
from alignpro_plugins.serving.config import ServeConfig
from alignpro_plugins.serving.upstream import Upstream

logger = logging.getLogger("alignpro_plugins.serving")


def upstream_key(config: ServeConfig) -> str | None:
    if config.upstream_api_key_env is None:
        return None
    value = os.environ.get(config.upstream_api_key_env, "")
    if not value:
        logger.warning(
            "upstream_api_key_env=%r is not set or empty: only clients' own keys are sent",
            config.upstream_api_key_env,
        )
    return value or None


def build_app(config: ServeConfig) -> FastAPI:
    """Load the prompter and connect the upstream (the upstream URL is checked before the prompter loads)."""
    from alignpro_plugins.prompter import Prompter

    upstream = Upstream(config.upstream, api_key=upstream_key(config), timeout=config.timeout)
    prompter = Prompter.from_pretrained(
        config.prompter, base_model=config.prompter_base, max_batch_size=config.max_batch_size
    )
    if config.mode is not None and config.mode not in prompter.manifest.instructions:
        raise ValueError(
            f"mode {config.mode!r} has no instruction template in {config.prompter}/alignpro.json; it has "
            f"{sorted(prompter.manifest.instructions)}"
        )
    return create_app(prompter, upstream, mode=config.mode, upstream_model=config.upstream_model)


def serve(config: ServeConfig) -> None:
    """Run the proxy until interrupted."""
    try:
        import uvicorn
    except ImportError as exc:
        raise ImportError(
            "alignpro serve needs uvicorn; install it with: pip install 'alignpro-plugins[serve]'"
        ) from exc

    app = build_app(config)
    print(f"alignpro proxy on http://{config.host}:{config.port}/v1 -> {app.state.upstream_url}", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")
