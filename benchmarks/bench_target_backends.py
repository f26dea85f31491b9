"""The frozen target's answers: local transformers against a vLLM server (CPU build) on loopback.

Generation is the cost of every stage that asks the frozen target (the SFT bootstrap, RL rounds, the guidance
search, evaluation). The trainers and the evaluator take any OpenAI-compatible endpoint as the target
(``target_base_url`` / ``OpenAICompatibleTarget``), so a batching server is a drop-in. This script answers the
same prompts, greedy, with the same answer cap:

- ``transformers <dtype>``: ``TransformersTarget`` in this process (batches of 32 planned by prompt length); fp32
  is what every stage does by default on a CPU and the reference the others are compared with, bf16
  (``target_dtype: bfloat16``) is the in-process option for CPUs with native bf16 (AMX);
- ``vllm <dtype>``: ``OpenAICompatibleTarget`` against ``python -m vllm.entrypoints.openai.api_server`` serving
  the packaged SmolLM2's safetensors copy, ``--concurrency`` requests in flight; the server is started and stopped
  here, and its start-up time is reported apart.

It reports seconds (the fastest of ``--repeats`` timings), generated words per second, the speed-up over
transformers, and how many answers are identical to transformers' (greedy decoding: fp32 should agree).

vLLM pins its own torch and transformers, so it lives in its own virtual environment:

    bash scripts/serve_vllm.sh --install-only                 # creates .venv-vllm (about 2 minutes, 3.4 GB)
    python -m benchmarks.bench_target_backends                # 64 prompts, ~10 minutes here
    python -m benchmarks.bench_target_backends --per-set 8 --dtypes float32 --no-docs
    python -m benchmarks.bench_target_backends --dtypes                 # in process only (no vLLM)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.run_benchmark import ROOT, first_eval_prompts, publish, run_lines

SERVED_NAME = "smollm2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def vllm_server(python: str, model_dir: str, dtype: str, log: Path, start_timeout: float = 600.0):
    """A vLLM OpenAI-compatible server on loopback for the block; yields (base_url, seconds it took to start)."""
    import httpx

    port = free_port()
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir,
        "--served-model-name",
        SERVED_NAME,
        "--dtype",
        dtype,
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    log.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with code {proc.returncode} before it served; see {log}")
            if time.perf_counter() - t > start_timeout:
                raise TimeoutError(f"vLLM did not serve within {start_timeout:.0f} s; see {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base_url}/models", timeout=2).status_code == 200:
                    break
            time.sleep(2)
        yield base_url, time.perf_counter() - t
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def cpu_bf16_flags() -> str:
    """The CPU's native-bf16 flags (AMX, AVX512-BF16), which decide whether bf16 is fast without a GPU."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return " ".join(f for f in line.split() if f in ("amx_bf16", "amx_tile", "avx512_bf16"))
    return ""


def timed(fn, repeats: int) -> tuple[float, list[str]]:
    """The fastest of ``repeats`` timings of fn() and its (last) output."""
    best, out = float("inf"), []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--per-set", type=int, default=32, help="prompts from each of dolly_eval and self_instruct_eval"
    )
    ap.add_argument("--max-new-tokens", type=int, default=128, help="answer cap (evaluation uses 128)")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight to the server")
    ap.add_argument(
        "--dtypes",
        nargs="*",
        default=["float32", "bfloat16"],
        help="vLLM --dtype values to measure (none: skip)",
    )
    ap.add_argument(
        "--local-dtypes",
        nargs="+",
        default=["float32", "bfloat16"],
        help="in-process dtypes to measure; the first is the reference",
    )
    ap.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--repeats", type=int, default=2, help="timings of each backend; the fastest is kept")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-docs", action="store_true", help="print only; do not touch docs/benchmarks.md")
    args = ap.parse_args()
    if args.dtypes and not Path(args.vllm_python).exists():
        sys.exit(
            f"no vLLM environment at {args.vllm_python}: run `bash scripts/serve_vllm.sh --install-only`"
        )
    torch.set_num_threads(args.threads)
    from alignpro_plugins.evaluation import answer_words
    from alignpro_plugins.models import resolve_model
    from alignpro_plugins.targets import OpenAICompatibleTarget, TransformersTarget

    prompts = first_eval_prompts(args.per_set)
    t0 = time.time()
    rows: list[str] = []

    def row(name: str, seconds: float, answers: list[str], ref: list[str], base: float, extra: str) -> str:
        words = sum(answer_words(a) for a in answers)
        same = sum(a == b for a, b in zip(answers, ref, strict=True))
        return (
            f"| {name} | {seconds:.1f} | {words / seconds:.1f} | {base / seconds:.2f}x | "
            f"{same}/{len(ref)} | {extra} |"
        )

    base, ref = 0.0, list[str]()
    for dtype in args.local_dtypes:
        local = TransformersTarget(
            "smollm2-135m-instruct",
            max_new_tokens=args.max_new_tokens,
            batch_size=32,
            device="cpu",
            dtype=dtype,
        )
        seconds, answers = timed(lambda t=local: t.generate(prompts), args.repeats)
        base, ref = (seconds, answers) if not ref else (base, ref)
        rows.append(row(f"transformers {dtype} (in process, batch 32)", seconds, answers, ref, base, "—"))
        del local  # the server needs the cores and the memory
    model_dir = resolve_model("smollm2-135m-instruct")
    for dtype in args.dtypes:
        log = ROOT / "runs" / "bench-backends" / f"vllm-{dtype}.log"
        with vllm_server(args.vllm_python, model_dir, dtype, log) as (url, started):
            served = OpenAICompatibleTarget(
                url, SERVED_NAME, max_tokens=args.max_new_tokens, concurrency=args.concurrency, timeout=600
            )
            served.generate(prompts[:2])  # warm-up: the first requests pay one-off set-up
            seconds, answers = timed(lambda s=served: s.generate(prompts), args.repeats)
        failed = sum(a.startswith("[target error") for a in answers)
        rows.append(
            row(
                f"vLLM-cpu {dtype} (HTTP, {args.concurrency} in flight)",
                seconds,
                answers,
                ref,
                base,
                f"started in {started:.0f} s; {failed} failed",
            )
        )
    md = [
        "## Frozen-target backends: transformers against a vLLM server",
        "",
        *run_lines(t0),
        f"- prompts: the first {args.per_set} of dolly_eval and of self_instruct_eval (with context), "
        f"{len(prompts)} in all; greedy, at most {args.max_new_tokens} new tokens, SmolLM2-135M-Instruct",
        f"- {args.repeats} timing(s) of each backend, the fastest kept; the server's start-up is not in its time",
        f"- CPU bf16 support (/proc/cpuinfo flags): {cpu_bf16_flags() or 'none'}",
        "",
        "| backend | seconds | words/s | speed-up | answers identical to the first row's | notes |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    section = "\n".join(md)
    publish(
        section, ROOT / "runs" / "bench-backends" / "section.md", "backends-benchmark", docs=not args.no_docs
    )


if __name__ == "__main__":
    main()
