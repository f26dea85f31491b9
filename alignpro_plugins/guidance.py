"""Fixed guidance texts: the `template` baseline and the library the SFT bootstrap scores beside samples.

In augment mode the prompter's output is guidance appended to x. Starting the bootstrap from a small library of
generic guidance (what a user would try first) lets the trained prompter begin at least where the baseline
is, and learn *which* guidance suits which prompt.
"""

from __future__ import annotations

# The `template` baseline of every evaluation: one fixed instruction appended to x.
DEFAULT_TEMPLATE = "Please give a thorough, well-organized and helpful answer."

# Chosen on 40 AlpacaEval training prompts (never evaluation prompts) with the packaged SmolLM2 target: five of
# these win 61-72% against the bare prompt under the independent judge (the numbered list ties it overall but
# wins where a list fits); none beats DEFAULT_TEMPLATE on more than 59% of prompts, yet the best text per
# prompt wins 80% against it — the headroom a prompter that learns which guidance suits which prompt can reach.
GUIDANCE_LIBRARY = [
    DEFAULT_TEMPLATE,
    "Answer in detail: explain the key points step by step, give concrete examples, and end with a short "
    "summary.",
    "Write a complete, detailed answer of several paragraphs. Cover every part of the request and include "
    "specific facts and examples.",
    "Respond with a numbered list of at least five detailed points, each explained in one or two sentences.",
    "Be specific and thorough. Use the information given in the request, and explain your reasoning.",
    "You are an expert. Give an accurate, comprehensive and well-structured answer with examples.",
]
