"""The ``alignpro serve`` flags and command (cli.py registers them)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from alignpro_plugins.serving.config import ServeConfig

HELP = {
    "upstream": "base URL of the OpenAI-compatible API that answers, e.g. http://127.0.0.1:8000/v1",
    "prompter": "prompter artifact folder or packaged prompter name (alignpro models); with --prompter-endpoint, "
    "the folder `alignpro export` wrote",
    "prompter_base": "the prompter's base model, when the folder alignpro.json records has moved",
    "prompter_endpoint": "OpenAI-compatible server generating the rewrites (e.g. vLLM serving the export)",
    "prompter_model": "the name --prompter-endpoint serves the exported prompter under",
    "prompter_api_key_env": "environment variable with the key for --prompter-endpoint",
    "upstream_model": "model name sent upstream instead of each client's",
    "upstream_api_key_env": "environment variable with the upstream API key, sent when a client sends none",
    "mode": "augment or rewrite (default: the prompter's mode)",
    "gate_reward": "reward model folder: ask the prompter only where the gate retries (with --gate-threshold or --rerank)",
    "gate_threshold": "retry with the rewrite where the reward scores the answer to the original below this",
    "rerank": "always answer the rewrite too and return the answer the reward scores higher",
    "host": "address to listen on (default loopback only)",
    "port": "port to listen on",
    "timeout": "seconds to wait for the upstream's answer",
    "max_batch_size": "most rewrites generated in one batch",
}


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`ServeConfig` field."""
    for f in fields(ServeConfig):
        if f.type == "bool":
            p.add_argument(
                "--" + f.name.replace("_", "-"), dest=f.name, action="store_true", help=HELP[f.name]
            )
            continue
        required = f.name in ("upstream", "prompter")
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=int if f.type == "int" else float if f.type in ("float", "float | None") else str,
            choices=["augment", "rewrite"] if f.name == "mode" else None,
            required=required,
            default=None if required else f.default,
            help=HELP[f.name],
        )


def cmd_serve(args: argparse.Namespace) -> int:
    from alignpro_plugins.serving.server import serve

    serve(ServeConfig(**{f.name: getattr(args, f.name) for f in fields(ServeConfig)}))
    return 0
