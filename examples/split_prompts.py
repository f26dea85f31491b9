"""Split one prompt file into the disjoint prompt files a recipe's stages read.

    python examples/split_prompts.py prompts.jsonl --out data --heldout 100 --search 128 --validation 64 --rl 288
    python examples/split_prompts.py --smoke   # a tiny generated file, split (used by the docs test)

The input is any prompt file or hub id the loaders read (``--field`` names its prompt column, ``--context-field``
an optional context column). Prompts are de-duplicated and shuffled (``--seed``), then cut into files of
``{"prompt": ...}`` rows under ``--out``:

- ``heldout_prompts.json``: the evaluation prompts (``eval: prompts``); no stage ever trains on them;
- ``search_prompts.json``: the guidance search's prompts, and the SFT bootstrap's (its answers are cached);
- ``validation_prompts.json``: the held-out training prompts that pick the guidance text (``validation_data``);
- ``rl_prompts.json``: the RL stage's prompts followed by the validation prompts, so that
  ``validation_prompts: <--validation>`` in the ``rl:`` section holds out exactly those to pick its round.

Every prompt lands in at most one of heldout, search and RL; a count larger than what is left takes what is left.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def split_prompts(
    prompts: list[str], heldout: int, search: int, validation: int, rl: int, seed: int = 0
) -> dict[str, list[str]]:
    """Disjoint slices of the shuffled, de-duplicated prompts; ``rl`` ends with the validation prompts."""
    unique = list(dict.fromkeys(p for p in prompts if p.strip()))
    random.Random(seed).shuffle(unique)
    slices: dict[str, list[str]] = {}
    start = 0
    for name, count in (("heldout", heldout), ("search", search), ("validation", validation), ("rl", rl)):
        slices[name] = unique[start : start + count]
        start += count
    slices["rl"] = slices["rl"] + slices["validation"]
    return slices


def write_split(slices: dict[str, list[str]], out: Path) -> dict[str, str]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, prompts in slices.items():
        if prompts:
            path = out / f"{name}_prompts.json"
            path.write_text(json.dumps([{"prompt": p} for p in prompts], indent=1, ensure_ascii=False) + "\n")
            paths[name] = str(path)
    return paths


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every flag's default."""


def main(argv: list[str] | None = None) -> dict[str, str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("source", nargs="?", help="prompt file or hub id")
    ap.add_argument("--out", default="data", help="folder for the split files")
    ap.add_argument("--field", default="prompt", help="prompt column of the source")
    ap.add_argument(
        "--context-field", default=None, help="optional context column, appended after a blank line"
    )
    ap.add_argument("--heldout", type=int, default=0, help="evaluation prompts (0: you have your own)")
    ap.add_argument("--search", type=int, default=16, help="guidance-search and SFT prompts")
    ap.add_argument("--validation", type=int, default=12, help="validation prompts (guidance text, RL round)")
    ap.add_argument("--rl", type=int, default=12, help="RL prompts (the validation prompts follow them)")
    ap.add_argument("--seed", type=int, default=0, help="shuffle seed")
    ap.add_argument(
        "--smoke", action="store_true", help="split a tiny generated file under a temporary folder"
    )
    args = ap.parse_args(argv)
    from alignpro_plugins.data import load_prompts

    if args.smoke:
        folder = Path(tempfile.mkdtemp(prefix="split-prompts-"))
        source = folder / "prompts.json"
        source.write_text(json.dumps([{"prompt": f"Explain topic {i}."} for i in range(12)]))
        args.source, args.out, args.heldout, args.search, args.validation, args.rl = (
            str(source),
            str(folder / "data"),
            2,
            4,
            2,
            3,
        )
    if not args.source:
        ap.error("give a prompt file or hub id (or --smoke)")
    prompts = load_prompts(args.source, field=args.field, context_field=args.context_field)
    slices = split_prompts(prompts, args.heldout, args.search, args.validation, args.rl, args.seed)
    paths = write_split(slices, Path(args.out))
    for name, path in paths.items():
        print(f"{name:<11} {len(slices[name]):>5} prompts  {path}")
    return paths


if __name__ == "__main__":
    main()
