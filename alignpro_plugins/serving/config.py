"""Settings of ``alignpro serve`` (the proxy), as a dataclass like the trainers' configs."""

from __future__ import annotations

from dataclasses import dataclass

from alignpro_plugins.manifest import MODES


@dataclass
class ServeConfig:
    """Where the prompter comes from, where requests go, and where the proxy listens."""

    upstream: str
    """Base URL of the OpenAI-compatible API answering the requests, e.g. ``http://127.0.0.1:8000/v1``."""
    prompter: str
    """Prompter artifact folder (``alignpro.json`` + adapter), or with ``prompter_endpoint`` the folder
    ``alignpro export`` wrote (the model that endpoint serves)."""
    prompter_base: str | None = None
    """The prompter's base model, when the folder its manifest records has moved (its hash is still checked)."""
    prompter_endpoint: str | None = None
    """Base URL of an OpenAI-compatible server generating the rewrites (e.g. vLLM serving the export);
    default: the prompter runs in this process."""
    prompter_model: str | None = None
    """The name ``prompter_endpoint`` serves the export under (needed with ``prompter_endpoint``)."""
    prompter_api_key_env: str | None = None
    """Environment variable holding the key for ``prompter_endpoint``."""
    upstream_model: str | None = None
    """Model name sent upstream instead of the one each client sends."""
    upstream_api_key_env: str | None = None
    """Environment variable holding the upstream key, sent when a client sends no ``Authorization`` header."""
    mode: str | None = None
    """``augment`` or ``rewrite``; default: the prompter's manifest mode."""
    gate_reward: str | None = None
    """Reward model folder for the retry gate (with ``gate_threshold``) or rerank (with ``rerank``)."""
    gate_threshold: float | None = None
    """Retry with the prompter's rewrite where the reward scores the answer to x below this."""
    rerank: bool = False
    """Always answer the rewrite too and keep the answer the reward scores higher (two upstream calls)."""
    host: str = "127.0.0.1"
    port: int = 8000
    timeout: float = 600.0
    """Seconds to wait for the upstream's answer."""
    max_batch_size: int = 16
    """Most rewrites generated together (concurrent requests are batched up to this)."""

    def __post_init__(self) -> None:
        if (self.prompter_endpoint is None) != (self.prompter_model is None):
            raise ValueError(
                "prompter_endpoint and prompter_model go together: the server's URL and the name it serves "
                "the exported prompter under"
            )
        if self.prompter_endpoint is not None and self.prompter_base is not None:
            raise ValueError("prompter_base is for a local prompter; a remote one needs no base model")
        if self.gate_reward is None and (self.gate_threshold is not None or self.rerank):
            raise ValueError(
                "gate_threshold and rerank score answers with gate_reward: give the reward model folder"
            )
        if self.gate_reward is not None and (self.gate_threshold is None) == (not self.rerank):
            raise ValueError(
                "gate_reward needs exactly one of gate_threshold (retry below that score) or rerank (always both)"
            )
        if self.mode is not None and self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES} or None (the manifest's), got {self.mode!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in 1..65535, got {self.port}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout}")
