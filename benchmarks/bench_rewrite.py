"""Prompter rewrite throughput and latency for the packaged zero-shot SmolLM2 prompter.

For each batch size b, waves of b concurrent callers (threads calling ``Prompter.rewrite_results([prompt])``,
the way a server or a LangChain ``batch`` drives it) each rewrite one prompt; the prompter's micro-batcher
turns a wave into one batched ``generate`` call (the script checks this). It reports prompts/s, generated
tokens/s and p50/p95 per-request latency, and writes the "Prompter rewrite throughput" section of
``docs/benchmarks.md`` (other sections are left as they are).

    python -m benchmarks.bench_rewrite                      # batch 1/8/32, about 1 minute on 2 idle cores
    python -m benchmarks.bench_rewrite --batch-sizes 1 8 --waves 4 --no-docs   # more samples, no docs
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks.run_benchmark import DATA, RESULTS_PAGE, command_line, write_section

SECTION_KEY = "rewrite-benchmark"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def load_prompts(path: Path) -> list[str]:
    rows = json.loads(path.read_text())
    prompts = [r["instruction"].strip() for r in rows if r.get("instruction", "").strip()]
    if not prompts:
        raise SystemExit(f"no instructions in {path}")
    return prompts


class GenerateSpy:
    """Counts batched ``generate`` calls and the new tokens they produce (up to and including EOS)."""

    def __init__(self, model, eos_id: int, pad_id: int) -> None:
        self.calls: list[int] = []
        self.new_tokens = 0
        self._lock = threading.Lock()
        real = model.generate

        def generate(*args, **kwargs):
            out = real(*args, **kwargs)
            new = out[:, kwargs["input_ids"].shape[1] :]
            count = 0
            for row in new.tolist():
                n = 0
                for tok in row:
                    n += 1
                    if tok in (eos_id, pad_id):
                        break
                count += n
            with self._lock:
                self.calls.append(new.shape[0])
                self.new_tokens += count
            return out

        model.generate = generate

    def reset(self) -> None:
        self.calls, self.new_tokens = [], 0


def run_batch_size(prompter, spy: GenerateSpy, prompts: list[str], batch: int, waves: int) -> dict:
    latencies: list[float] = []
    fallbacks = 0
    spy.reset()
    start = time.perf_counter()
    with ThreadPoolExecutor(batch) as pool:
        for w in range(waves):
            wave = [prompts[(w * batch + i) % len(prompts)] for i in range(batch)]
            barrier = threading.Barrier(batch)

            def call(p: str, barrier: threading.Barrier = barrier):
                barrier.wait()
                t0 = time.perf_counter()
                (r,) = prompter.rewrite_results([p])
                return time.perf_counter() - t0, r

            for latency, result in pool.map(call, wave):
                latencies.append(latency)
                fallbacks += result.fallback_reason is not None
    wall = time.perf_counter() - start
    n = batch * waves
    return {
        "batch": batch,
        "requests": n,
        "generate_calls": len(spy.calls),
        "batch_sizes_seen": sorted(set(spy.calls)),
        "wall_s": wall,
        "prompts_per_s": n / wall,
        "tokens_per_s": spy.new_tokens / wall,
        "mean_new_tokens": spy.new_tokens / n,
        "p50_s": percentile(latencies, 50),
        "p95_s": percentile(latencies, 95),
        "mean_s": statistics.fmean(latencies),
        "rewritten": n - fallbacks,
    }


def render_section(meta: dict, rows: list[dict]) -> str:
    lines = [
        "## Prompter rewrite throughput",
        "",
        'Zero-shot SmolLM2-135M-Instruct prompter (`Prompter.from_base("smollm2-135m-instruct")`, '
        f"{meta['mode']} mode, greedy, max_new_tokens={meta['max_new_tokens']}, fp32 on CPU); prompts are the "
        "`instruction` field of `../shared/data/dolly_eval.json`. For batch size b, waves of b concurrent "
        "callers (threads calling `Prompter.rewrite_results([prompt])`) each rewrite one prompt; the "
        'micro-batcher turns each wave into one `generate` call ("generate calls" below checks it). Latency '
        "is per request, from call to result, so at batch b it is the time of a whole batched generation. "
        "Throughput counts generated tokens up to and including EOS.",
        "",
        f"- Command: `{meta['command']}`",
        f"- Date: {meta['date']}",
        f"- Machine: {meta['nproc']} CPUs (nproc), {meta['cpu']}, {meta['memory']}; no GPU; "
        f"torch threads {meta['threads']}; 1-minute load average {meta['loadavg'][0]:.1f} just before the run "
        f"and {meta['loadavg'][1]:.1f} at its end (the run itself adds about {meta['threads']}; other processes "
        "share these cores, so a high starting load means pessimistic numbers)",
        f"- Software: Python {meta['python']}, torch {meta['torch']}, transformers {meta['transformers']}",
        f"- Model load (from the converted cache): {meta['load_s']:.1f} s",
        "",
        "| batch | requests | generate calls | prompts/s | generated tok/s | mean new tokens | p50 latency (s) "
        "| p95 latency (s) | rewritten (guard passed) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['requests']} | {r['generate_calls']} | {r['prompts_per_s']:.2f} | "
            f"{r['tokens_per_s']:.1f} | {r['mean_new_tokens']:.1f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | "
            f"{r['rewritten']}/{r['requests']} |"
        )
    base = rows[0]
    if len(rows) > 1:
        speedups = ", ".join(
            f"batch {r['batch']}: {r['prompts_per_s'] / base['prompts_per_s']:.1f}x prompts/s"
            for r in rows[1:]
        )
        lines += ["", f"Throughput relative to batch {base['batch']}: {speedups}."]
    best = max(rows, key=lambda r: r["prompts_per_s"])
    lines.append(
        f"Best throughput in this run: batch {best['batch']} ({best['prompts_per_s']:.2f} prompts/s)."
    )
    single_wave = [str(r["batch"]) for r in rows if r["batch"] > 1 and r["requests"] == r["batch"]]
    if single_wave:
        lines.append(
            f"Batch {', '.join(single_wave)} ran one wave each, so p50 and p95 there are one measurement "
            "(every request of a wave finishes with the batch); use `--waves N` for more samples."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--waves", type=int, default=1, help="waves per batch size (batch 1 runs 4x as many)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--mode", choices=["augment", "rewrite"], default="augment")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    ap.add_argument("--data", type=Path, default=DATA / "dolly_eval.json")
    ap.add_argument("--docs", type=Path, default=RESULTS_PAGE)
    ap.add_argument("--no-docs", action="store_true", help="print only; do not touch docs/benchmarks.md")
    ap.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers

    from alignpro_plugins.prompter import Prompter

    torch.set_num_threads(args.threads)
    prompts = load_prompts(args.data)
    load_before = os.getloadavg()[0]

    t0 = time.perf_counter()
    prompter = Prompter.from_base(
        "smollm2-135m-instruct", mode=args.mode, device="cpu", max_batch_size=max(args.batch_sizes)
    )
    load_s = time.perf_counter() - t0
    prompter.manifest.generation.max_new_tokens = args.max_new_tokens
    tok = prompter.tokenizer
    spy = GenerateSpy(prompter.model, tok.eos_token_id, tok.pad_token_id)
    prompter.rewrite_results(["Warm up."], max_new_tokens=4)

    rows = []
    offset = 0
    for batch in args.batch_sizes:
        waves = args.waves * 4 if batch == 1 else args.waves
        row = run_batch_size(prompter, spy, prompts[offset:] + prompts[:offset], batch, waves)
        offset = (offset + batch * waves) % len(prompts)  # fresh prompts for each setting
        if row["batch_sizes_seen"] != [batch]:
            print(
                f"warning: batch {batch} ran as generate batches {row['batch_sizes_seen']}", file=sys.stderr
            )
        rows.append(row)
        print(
            f"batch {batch:>3}: {row['requests']:>3} requests in {row['wall_s']:.1f} s, "
            f"{row['prompts_per_s']:.2f} prompts/s, {row['tokens_per_s']:.1f} tok/s, "
            f"p50 {row['p50_s']:.2f} s, p95 {row['p95_s']:.2f} s, generate calls {row['generate_calls']}",
            flush=True,
        )
    prompter.close()

    meminfo = Path("/proc/meminfo").read_text().split("\n")[0] if Path("/proc/meminfo").exists() else ""
    mem_kb = int(re.findall(r"\d+", meminfo)[0]) if meminfo else 0
    meta = {
        "command": command_line(argv),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "memory": f"{mem_kb / 2**20:.0f} GiB RAM" if mem_kb else "unknown RAM",
        "threads": args.threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "mode": args.mode,
        "max_new_tokens": args.max_new_tokens,
        "load_s": load_s,
        "loadavg": (load_before, os.getloadavg()[0]),
    }
    section = render_section(meta, rows)
    print()
    print(section)
    if not args.no_docs:
        write_section(args.docs, SECTION_KEY, section.rstrip("\n"))
        print(f"wrote the section to {args.docs}")
    result = {"meta": meta, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
