"""Ship a trained prompter inside the package, with its model card, and check a retrained one against it.

    python -m benchmarks.ship_prompter --artifact runs/bench/rl-kl --summary docs/benchmark-summary.json
    python -m benchmarks.ship_prompter --compare runs/bench-repro/eval/results.json

Shipping writes ``alignpro_plugins/prompters/<name>/`` (``--name``, default ``smollm2-135m-prompter``) and its
entry in ``alignpro_plugins/prompters/index.json``, so ``Prompter.from_pretrained("<name>")`` loads it. The folder
holds only what the runtime reads: the LoRA adapter converted to float16 safetensors, ``adapter_config.json``,
``alignpro.json`` (its provenance kept, paths of the training machine made relative or replaced by their names),
``chat_template.jinja`` (for plain tools), the tokenizer only when it differs from the base model's (the runtime
then loads the base's), ``benchmark.json`` (the summary numbers the card quotes, which ``--compare`` reads) and the
model card ``README.md`` (:mod:`benchmarks.prompter_card`). Round checkpoints, metrics and
target caches stay behind. Before anything is replaced, the new folder is loaded as users load it (its base-model
hash and adapter checked) and its greedy rewrites of held-out prompts are compared with the trained artifact's.

``--compare`` reads a retrained run's summary (``<out>/eval/results.json`` or a ``benchmark-summary.json``) and
reports, per headline number, the shipped value with its 95% interval, the retrained value and whether it falls
inside; the exit code is 1 when any does not. ``--record`` also stores that comparison, with the retrained run's
command, commit and machine, in the shipped folder's ``benchmark.json`` and regenerates the card to show it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from alignpro_plugins.artifact import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from alignpro_plugins.manifest import MANIFEST_NAME, Manifest, portable_base_name, weights_hash
from alignpro_plugins.prompters import INDEX_NAME, PACKAGE_DIR, SHIPPED_PROMPTER, PackagedPrompter
from benchmarks.prompter_card import SummaryError, comparison_table, headlines, render_card

ROOT = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = "chat_template.jinja"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
BENCHMARK = "benchmark.json"
CARD = "README.md"
DEFAULT_CHECK_PROMPTS = 16


class ShipError(ValueError):
    """An artifact or summary that cannot be shipped as it is; the message says what is wrong."""


# ---------------------------------------------------------------------------------------------- the weights
def convert_to_fp16(src: Path, dst: Path) -> dict[str, Any]:
    """Write ``src``'s tensors as float16 safetensors to ``dst``; what the conversion changed.

    Refuses a weight that float16 cannot hold (beyond its range: it would become infinite).
    """
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(src))
    out, params, max_error, flushed, dtypes = {}, 0, 0.0, 0, set()
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            out[key] = tensor
            continue
        dtypes.add(str(tensor.dtype).removeprefix("torch."))
        half = tensor.to(torch.float16)
        if not torch.isfinite(half).all():
            raise ShipError(
                f"{src}: tensor {key} has values beyond float16's range (max {tensor.abs().max()})"
            )
        params += tensor.numel()
        max_error = max(max_error, float((half.to(tensor.dtype) - tensor).abs().max()))
        flushed += int(((tensor != 0) & (half == 0)).sum())
        out[key] = half.contiguous()
    save_file(out, str(dst), metadata={"format": "pt"})
    return {
        "dtype": "float16",
        "source_dtype": "/".join(sorted(dtypes)),
        "parameters": params,
        "bytes": dst.stat().st_size,
        "source_bytes": src.stat().st_size,
        "max_abs_error": max_error,
        "flushed_to_zero": flushed,
    }


# ---------------------------------------------------------------------------------------------- the manifest
def portable_path(path: Path) -> str:
    """A path of the training machine as another machine reads it: relative to the checkout when inside it
    (``runs/bench/reward``), else its name and a note that it stayed on that machine."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return f"{path.name} (a local path of the machine that trained it)"


def portable(value: Any) -> Any:
    """``value`` with every absolute path in it made portable (:func:`portable_path`)."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value):
        return portable_path(Path(value))
    return value


def shipped_manifest(manifest: Manifest, artifact: Path, meta: dict[str, Any]) -> Manifest:
    """The manifest to ship: a portable base, portable provenance, and where it was shipped from."""
    if (
        Path(manifest.base_model).is_absolute()
        or portable_base_name(manifest.base_model) != manifest.base_model
    ):
        raise ShipError(
            f"{artifact}/{MANIFEST_NAME} names its base model {manifest.base_model!r}, a folder of this machine: a "
            "shipped prompter must name a packaged model or a hub id (its hash is checked on every load)"
        )
    if not manifest.has_adapter or not manifest.base_model_hash:
        raise ShipError(
            f"{artifact} has no adapter or no base_model_hash: only a trained, verifiable prompter is shipped"
        )
    provenance = portable(manifest.provenance)
    provenance["shipped"] = {
        "artifact": portable_path(artifact),
        "weights": "float16, converted from the trained adapter's weights",
        "git": meta.get("git"),
        "command": meta.get("command"),
        "date": meta.get("date"),
    }
    manifest.provenance = provenance
    return manifest


# ---------------------------------------------------------------------------------------------- the tokenizer
def tokenizer_matches_base(artifact: Path, manifest: Manifest) -> bool:
    """Whether the artifact's tokenizer is the base model's (same vocabulary, rules and special tokens, same ids
    for a few queries): the runtime then loads the base's, and the shipped folder needs none."""
    from transformers import AutoTokenizer

    from alignpro_plugins.models import resolve_model

    if not (artifact / "tokenizer_config.json").is_file():
        return True
    own = AutoTokenizer.from_pretrained(str(artifact))
    base = AutoTokenizer.from_pretrained(resolve_model(manifest.base_model))
    for tok in (own, base):  # as the runtime sets them (engine.load_causal_lm, prompter._artifact_tokenizer)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    if not (hasattr(own, "backend_tokenizer") and hasattr(base, "backend_tokenizer")):
        return False
    probes = [
        manifest.instructions[manifest.mode].replace("{prompt}", p)
        for p in ("Explain tides.", "Écris un poème 🌊 sur la mer.\n\n  Tabs\tand  spaces")
    ]
    same_special = all(
        getattr(own, f"{t}_token_id") == getattr(base, f"{t}_token_id") for t in ("bos", "eos", "pad", "unk")
    )
    return (
        own.backend_tokenizer.to_str() == base.backend_tokenizer.to_str()
        and same_special
        and all(own(p)["input_ids"] == base(p)["input_ids"] for p in probes)
    )


def read_summary(path: Path) -> dict[str, Any]:
    """The Evaluator summary in a benchmark-summary.json ({"meta", "summary"}) or an eval/results.json."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShipError(f"{path}: no such file") from None
    except json.JSONDecodeError as exc:
        raise ShipError(f"{path}: not JSON ({exc.msg}, line {exc.lineno})") from None
    summary = data.get("summary") if isinstance(data, dict) else None
    if not isinstance(summary, dict) or "configs" not in summary:
        raise ShipError(
            f"{path} holds no Evaluator summary (a 'summary' object with 'configs'): give the standard benchmark's "
            "docs/benchmark-summary.json or a run's <out>/eval/results.json"
        )
    return summary


def card_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The part of an Evaluator summary the card quotes (same shape), checked to hold every headline."""
    focus, reference = summary.get("focus"), summary.get("reference")
    for name in (focus, reference, "template"):
        if name not in summary["configs"]:
            raise ShipError(
                f"the summary has no {name!r} configuration (it has {sorted(summary['configs'])}): the card compares "
                "the trained prompter with the bare prompt and the default instruction"
            )
    kept = {
        "n_prompts": summary["n_prompts"],
        "judges": summary["judges"],
        "reference": reference,
        "focus": focus,
        "configs": {n: summary["configs"][n] for n in (reference, "template", focus)},
        "head_to_head": {"template": summary["head_to_head"].get("template")},
    }
    for h in headlines():
        h.read(kept)
    return kept


# ---------------------------------------------------------------------------------------------- checks
def half_precision_check(original: Path, shipped: Path, prompts: Sequence[str]) -> dict[str, Any]:
    """Load the shipped folder as users do (base hash and adapter checked) and, on ``prompts``, compare its
    greedy rewrites with the trained artifact's (``original``, full precision): how many are identical."""
    from alignpro_plugins.prompter import Prompter

    new = Prompter.from_pretrained(shipped, similarity=None)
    try:
        if not prompts:
            return {"prompts": 0, "identical": 0}
        old = Prompter.from_pretrained(original, similarity=None)
        try:
            a = [r.generated for r in old.rewrite_results(list(prompts), do_sample=False)]
        finally:
            old.close()
        b = [r.generated for r in new.rewrite_results(list(prompts), do_sample=False)]
    finally:
        new.close()
    return {"prompts": len(prompts), "identical": sum(x == y for x, y in zip(a, b, strict=True))}


def held_out_prompts(n: int) -> list[str]:
    """The first held-out evaluation prompts, half from each set (the benchmark evaluates these too)."""
    from alignpro_plugins.data import load_prompts
    from benchmarks.run_benchmark import DATA, EVAL_SETS

    if n <= 0:
        return []
    missing = [name for name in EVAL_SETS if not (DATA / name).is_file()]
    if missing:
        raise ShipError(
            f"the held-out prompts for the half-precision check are missing ({', '.join(missing)} in {DATA}): set "
            "ALIGNPRO_SHARED_DATA, or pass --check-prompts 0"
        )
    per_set = -(-n // len(EVAL_SETS))
    prompts = [
        p
        for name in EVAL_SETS
        for p in load_prompts(str(DATA / name), field="instruction", context_field="context", limit=per_set)
    ]
    return prompts[:n]


# ---------------------------------------------------------------------------------------------- shipping
def write_benchmark(folder: Path, benchmark: dict[str, Any]) -> None:
    (folder / BENCHMARK).write_text(
        json.dumps(benchmark, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    )


def ship(
    artifact: Path,
    summary_file: Path,
    name: str = SHIPPED_PROMPTER,
    *,
    root: Path = PACKAGE_DIR,
    check_prompts: Sequence[str] = (),
) -> Path:
    """Write ``root/name`` from the trained ``artifact`` and the benchmark summary, and list it in the index."""
    if name != name.lower() or not name.replace("-", "").replace(".", "").isalnum():
        raise ShipError(f"--name {name!r}: use lower-case letters, digits, '-' and '.' (it is a folder name)")
    manifest = Manifest.load(artifact)
    data = json.loads(summary_file.read_text())
    meta = data.get("meta") if isinstance(data, dict) else None
    if not isinstance(meta, dict):
        raise ShipError(
            f"{summary_file} has no 'meta' (command, git, budget): ship from the standard benchmark's "
            "docs/benchmark-summary.json"
        )
    benchmark: dict[str, Any] = {"meta": meta, "summary": card_summary(read_summary(summary_file))}
    manifest = shipped_manifest(manifest, artifact, meta)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        benchmark["weights"] = convert_to_fp16(artifact / ADAPTER_WEIGHTS, tmp / ADAPTER_WEIGHTS)
        adapter = json.loads((artifact / ADAPTER_CONFIG).read_text())
        adapter["base_model_name_or_path"] = manifest.base_model
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(adapter, indent=2, sort_keys=True) + "\n")
        if (artifact / CHAT_TEMPLATE).is_file():
            shutil.copy2(artifact / CHAT_TEMPLATE, tmp / CHAT_TEMPLATE)
        benchmark["tokenizer_shipped"] = not tokenizer_matches_base(artifact, manifest)
        if benchmark["tokenizer_shipped"]:
            for f in TOKENIZER_FILES:
                shutil.copy2(artifact / f, tmp / f)
        manifest.save(tmp)
        benchmark["half_precision"] = half_precision_check(artifact, tmp, check_prompts)
        write_benchmark(tmp, benchmark)
        (tmp / CARD).write_text(render_card(name, manifest, adapter, benchmark))
        folder = root / name
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    entry = PackagedPrompter(
        name=name,
        base_model=manifest.base_model,
        base_model_hash=str(manifest.base_model_hash),
        weights_hash=weights_hash(folder),
        files=tuple(sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))),
        description=(
            f"trained prompter for {manifest.base_model} (mode {manifest.mode}), standard benchmark at git "
            f"{meta.get('git')}; card: {folder.name}/{CARD}"
        ),
        root=root,
    )
    index_path = root / INDEX_NAME
    index = json.loads(index_path.read_text()) if index_path.is_file() else {}
    index[name] = entry.as_dict()
    index_path.write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------- reproduction
def compare_rows(shipped: dict[str, Any], retrained: dict[str, Any]) -> list[dict[str, Any]]:
    """Per headline number: the shipped win rate with its 95% interval, the retrained one, and whether the
    retrained value falls inside the interval."""
    rows = []
    for h in headlines():
        s, r = h.read(shipped), h.read(retrained)
        rows.append(
            {
                "label": h.label,
                "judge": h.judge,
                "shipped": {k: s[k] for k in ("win_rate", "ci_low", "ci_high")},
                "retrained": r["win_rate"],
                "inside": s["ci_low"] <= r["win_rate"] <= s["ci_high"],
            }
        )
    return rows


def compare(shipped: dict[str, Any], retrained: dict[str, Any]) -> tuple[list[str], bool]:
    """The comparison as a table, and whether every retrained number falls inside its shipped interval."""
    rows = compare_rows(shipped, retrained)
    lines = comparison_table(rows, outside="NO")
    if shipped["n_prompts"] != retrained["n_prompts"]:
        lines.append(
            f"\nNote: the shipped run evaluated {shipped['n_prompts']} prompts, the retrained one "
            f"{retrained['n_prompts']}: the numbers are not on the same prompts."
        )
    return lines, all(r["inside"] for r in rows)


RUN_FIELDS = ("command", "git", "date")


def retrained_meta(path: Path, shipped_meta: dict[str, Any]) -> dict[str, Any]:
    """Where and how the retrained run ran: the ``meta`` of its benchmark summary (the file given, or the
    ``benchmark-summary.json`` beside an ``eval/results.json``), with its command, commit and date."""
    for candidate in (path, path.parent / "benchmark-summary.json"):
        try:
            meta = json.loads(candidate.read_text()).get("meta")
        except (OSError, ValueError, AttributeError):
            continue
        if not isinstance(meta, dict):
            continue
        missing = [k for k in RUN_FIELDS if not meta.get(k)]
        if missing:
            raise ShipError(
                f"{candidate}: its run metadata lacks {', '.join(missing)}: record a run written by "
                "benchmarks.run_benchmark"
            )
        if all(meta.get(k) == shipped_meta.get(k) for k in (*RUN_FIELDS, "machine")):
            raise ShipError(
                f"{candidate} is the shipped run itself (same command, commit, date and machine): a reproduction "
                "is a new run, e.g. `python -m benchmarks.run_benchmark --skip-oracle --no-docs --out "
                "runs/bench-repro`"
            )
        return meta
    raise ShipError(
        f"{path}: no run metadata (command, git, date) in it or in a benchmark-summary.json beside it, so the "
        "reproduction cannot be recorded: give the retrained run's <out>/eval/benchmark-summary.json"
    )


def same_half_weights(trained: Path, shipped: Path) -> bool | None:
    """Whether a trained adapter, converted to float16 as shipping converts it, has the shipped adapter's exact
    weights (None: no adapter at ``trained``)."""
    import torch
    from safetensors.torch import load_file

    if not trained.is_file():
        return None
    ours, theirs = load_file(str(trained)), load_file(str(shipped))
    if ours.keys() != theirs.keys():
        return False
    return all(
        torch.equal(t.to(torch.float16) if t.is_floating_point() else t, theirs[k]) for k, t in ours.items()
    )


def record_reproduction(
    folder: Path,
    benchmark: dict[str, Any],
    retrained: dict[str, Any],
    meta: dict[str, Any],
    retrained_file: Path,
) -> None:
    """Store the comparison in the shipped folder's ``benchmark.json`` and regenerate its card, which then shows
    how the retrained run (its summary and ``meta``, read from ``retrained_file``) fell against the shipped
    intervals."""
    focus = retrained["configs"][retrained["focus"]]
    benchmark["reproduction"] = {
        **{k: meta.get(k) for k in ("git", "date", "machine", "guidance_text")},
        # The run's folder as another checkout names it (the card is read on other machines).
        "command": meta["command"].replace(f"{ROOT}{os.sep}", ""),
        "n_prompts": retrained["n_prompts"],
        "rows": compare_rows(benchmark["summary"], retrained),
        "outputs": focus.get("outputs"),
        "mean_answer_words": focus.get("mean_answer_words"),
        # <out>/eval/results.json -> <out>/rl-kl: the run's trained prompter, when it is still there
        "same_weights": same_half_weights(
            retrained_file.parent.parent / "rl-kl" / ADAPTER_WEIGHTS, folder / ADAPTER_WEIGHTS
        ),
    }
    # The card is rendered before anything is written: a failure leaves the folder as it was.
    card = render_card(
        folder.name,
        Manifest.load(folder),
        json.loads((folder / ADAPTER_CONFIG).read_text()),
        benchmark,
    )
    write_benchmark(folder, benchmark)
    (folder / CARD).write_text(card)


def run_compare(retrained_file: Path, shipped_folder: Path, *, record: bool = False) -> int:
    benchmark_file = shipped_folder / BENCHMARK
    if not benchmark_file.is_file():
        raise ShipError(f"{shipped_folder} holds no {BENCHMARK}: it was not written by this script")
    shipped = json.loads(benchmark_file.read_text())
    retrained = read_summary(retrained_file)
    # Refused before a comparison is printed that would not be recorded.
    run_meta = retrained_meta(retrained_file, shipped["meta"]) if record else None
    lines, ok = compare(shipped["summary"], retrained)
    meta = shipped["meta"]
    print(
        f"shipped: {shipped_folder} (git {meta.get('git')}, `{meta.get('command')}`); retrained: {retrained_file}"
    )
    print("\n".join(lines))
    n = len(headlines())
    print(
        f"\nall {n} retrained numbers fall inside the shipped 95% intervals"
        if ok
        else "\nsome retrained numbers fall outside the shipped 95% intervals (NO above)"
    )
    if run_meta is not None:
        record_reproduction(shipped_folder, shipped, retrained, run_meta, retrained_file)
        print(f"recorded in {benchmark_file} and {shipped_folder / CARD}")
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument(
        "--artifact", type=Path, help="the trained prompter folder to ship (e.g. runs/bench/rl-kl)"
    )
    ap.add_argument(
        "--summary",
        type=Path,
        help="the standard benchmark's summary (docs/benchmark-summary.json) it was measured in",
    )
    ap.add_argument("--name", default=SHIPPED_PROMPTER, help="the name it loads by (its folder's name)")
    ap.add_argument(
        "--root", type=Path, default=PACKAGE_DIR, help="where packaged prompters and index.json live"
    )
    ap.add_argument(
        "--check-prompts",
        type=int,
        default=DEFAULT_CHECK_PROMPTS,
        help="held-out prompts on which the float16 adapter's greedy rewrites are compared with the trained one's",
    )
    ap.add_argument(
        "--compare",
        type=Path,
        metavar="SUMMARY",
        help="a retrained run's summary (<out>/eval/results.json): compare it with the shipped prompter's numbers",
    )
    ap.add_argument(
        "--record",
        action="store_true",
        help="with --compare: store the comparison in the shipped folder's benchmark.json and show it on its card",
    )
    args = ap.parse_args(argv)
    try:
        if args.compare:
            if args.artifact or args.summary:
                ap.error(
                    "--compare reads the shipped prompter's numbers: give it without --artifact / --summary"
                )
            return run_compare(args.compare, args.root / args.name, record=args.record)
        if args.record:
            ap.error("--record stores a --compare result: give it with --compare SUMMARY")
        if not (args.artifact and args.summary):
            ap.error("give --artifact and --summary to ship a prompter, or --compare SUMMARY")
        folder = ship(
            args.artifact,
            args.summary,
            args.name,
            root=args.root,
            check_prompts=held_out_prompts(args.check_prompts),
        )
    except (ShipError, SummaryError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    benchmark = json.loads((folder / BENCHMARK).read_text())
    half, weights = benchmark["half_precision"], benchmark["weights"]
    print(f"shipped {args.name} -> {folder} ({', '.join(sorted(p.name for p in folder.iterdir()))})")
    print(f"weights: {weights['bytes'] / 1e6:.1f} MB float16 (from {weights['source_bytes'] / 1e6:.1f} MB)")
    if half["prompts"]:
        print(
            f"half precision: {half['identical']} of {half['prompts']} greedy rewrites identical to the trained "
            "adapter's"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
