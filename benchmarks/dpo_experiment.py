"""Experiment (docs/benchmarks.md, "What would move it next"): DPO of the benchmark's SFT prompter against itself.

Pairs come from the bootstrap's scored candidates (runs/bench/sft/bootstrap.jsonl): per prompt the best vs the
worst and the second best vs the second worst rewrite, when their rewards differ by at least 0.3. The reference
log-probs are the SFT prompter's, precomputed. Writes runs/bench/dpo-experiment/; evaluate it like any prompter.

    python benchmarks/dpo_experiment.py   # after run_benchmark.py
"""

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import datasets  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from alignpro_plugins.prompter import Prompter  # noqa: E402

out = ROOT / "runs" / "bench"
dst = out / "dpo-experiment"
rows = [json.loads(line) for line in (out / "sft" / "bootstrap.jsonl").read_text().splitlines()]
policy = Prompter.from_pretrained(out / "sft", is_trainable=True)
ref = Prompter.from_pretrained(out / "sft").model.merge_and_unload().eval()
pairs = []
for r in rows:
    cands = sorted(
        [c for c in r["candidates"] if c["text"] and not c["fallback"]],
        key=lambda c: c["reward"],
        reverse=True,
    )
    for i in range(2):
        if len(cands) >= 2 * (i + 1):
            hi, lo = cands[i], cands[-1 - i]
            if hi["reward"] - lo["reward"] >= 0.3:
                pairs.append(
                    {
                        "prompt": policy.format_query(r["prompt"], "augment"),
                        "chosen": hi["text"],
                        "rejected": lo["text"],
                    }
                )
print("pairs", len(pairs), flush=True)
policy.tokenizer.padding_side = "right"
args = DPOConfig(
    output_dir=str(dst / "ckpt"),
    beta=0.1,
    learning_rate=1e-4,
    num_train_epochs=1,
    precompute_ref_log_probs=True,
    per_device_train_batch_size=8,
    bf16=False,
    gradient_checkpointing=False,
    report_to="none",
    logging_steps=4,
    save_strategy="no",
    max_length=512,
    seed=0,
)
t = time.time()
trainer = DPOTrainer(
    model=policy.model,
    ref_model=ref,
    args=args,
    train_dataset=datasets.Dataset.from_list(pairs),
    processing_class=policy.tokenizer,
)
trainer.train()
print("train s", time.time() - t, flush=True)
for h in trainer.state.log_history:
    print({k: round(v, 3) for k, v in h.items() if isinstance(v, float)})
policy.tokenizer.padding_side = "left"
policy.model = trainer.model.eval()
policy.save_pretrained(dst)
print("saved", flush=True)
