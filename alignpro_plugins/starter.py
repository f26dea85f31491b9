"""A small starter data set that the project writes itself, so the quickstart runs on a fresh offline machine.

It is generated from templates (nothing is copied from elsewhere): prompts over everyday topics and task kinds,
preference pairs whose chosen answer is specific, structured and on topic and whose rejected answer is terse,
evasive or off topic, and disjoint train / held-out prompt lists. Real recipes use public preference data
(see docs/recipes); this set only has to be good enough to show the pipeline working end to end.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = [
    "composting at home",
    "learning a second language",
    "saving for retirement",
    "training for a 5k run",
    "growing tomatoes",
    "writing a cover letter",
    "brewing green tea",
    "caring for a houseplant",
    "reducing screen time",
    "planning a road trip",
    "baking sourdough bread",
    "starting a podcast",
    "choosing a laptop",
    "improving sleep",
    "public speaking",
    "keeping a budget",
    "learning to swim",
    "organizing a small kitchen",
    "studying for an exam",
    "adopting a rescue dog",
    "meditation for beginners",
    "repairing a bicycle tire",
    "writing a haiku",
    "photographing at night",
    "hosting a dinner party",
    "negotiating a salary",
    "cleaning a cast iron pan",
    "birdwatching",
    "reading more books",
    "making cold brew coffee",
    "setting up a home office",
    "teaching a child to ride a bike",
    "preparing for a job interview",
    "recycling electronics",
    "planting a pollinator garden",
    "learning to juggle",
]
TASKS = [
    "Explain the basics of {t}.",
    "Give me some tips for {t}.",
    "What mistakes should I avoid when {g}?",
    "How do I get started with {t}?",
    "Write a short paragraph about {t}.",
    "What are the benefits of {t}?",
]
CHOSEN = [
    "Here is a practical overview of {t}.\n\n1. Start small: pick one concrete goal and a realistic schedule.\n"
    "2. Learn the key ideas first, then practice them regularly and note what works.\n"
    "3. Use good tools and ask for feedback from people with experience.\n"
    "4. Track your progress and adjust every week or two.\n\nIn short, {t} rewards steady, specific effort: "
    "begin with the basics, practise consistently, and refine as you learn.",
    "Great question. {T} comes down to a few clear steps. First, understand why it matters and what a good "
    "result looks like. Second, prepare what you need before you begin, so the first attempt is easy. Third, "
    "practise with a simple example, check the outcome, and fix one thing at a time. For example, many people "
    "keep a short log so they can see which changes helped. Finally, be patient: most progress with {t} comes "
    "from small improvements repeated over weeks.",
]
REJECTED = [
    "I don't know much about that.",
    "{T}.",
    "It depends. Look it up online.",
    "Sure! Anyway, the weather has been nice lately.",
    "Just do it however you like.",
]


def _gerund(topic: str) -> str:
    return topic if topic.split()[0].endswith("ing") else f"doing {topic}"


def write_starter_set(folder: str | Path, *, seed: int = 0, n_heldout_topics: int = 8) -> dict[str, str]:
    """Write preferences.jsonl, train_prompts.json and heldout_prompts.json; held-out TOPICS never appear in
    training, so evaluation measures generalisation, not memory. The default holds out 8 of the 36 topics: 48
    held-out prompts (enough for a win rate's interval of about ±14 points), 168 training prompts."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    topics = list(TOPICS)
    rng.shuffle(topics)
    held, train = set(topics[:n_heldout_topics]), topics[n_heldout_topics:]
    prefs = []
    for t in train:
        for task in TASKS:
            x = task.format(t=t, g=_gerund(t))
            for _ in range(2):
                fill = {"t": t, "T": t[0].upper() + t[1:]}
                prefs.append(
                    {
                        "prompt": x,
                        "chosen": rng.choice(CHOSEN).format(**fill),
                        "rejected": rng.choice(REJECTED).format(**fill),
                    }
                )
    train_prompts = [task.format(t=t, g=_gerund(t)) for t in train for task in TASKS]
    heldout = [task.format(t=t, g=_gerund(t)) for t in sorted(held) for task in TASKS]
    rng.shuffle(train_prompts)
    paths = {
        "preferences": folder / "preferences.jsonl",
        "train_prompts": folder / "train_prompts.json",
        "heldout_prompts": folder / "heldout_prompts.json",
    }
    paths["preferences"].write_text("".join(json.dumps(r) + "\n" for r in prefs))
    paths["train_prompts"].write_text(json.dumps([{"prompt": p} for p in train_prompts], indent=1))
    paths["heldout_prompts"].write_text(json.dumps([{"prompt": p} for p in heldout], indent=1))
    return {k: str(v) for k, v in paths.items()}
