"""Batches for the reward stage that cost less on a CPU, with the same loss and gradients.

* :func:`prompt_grouped_order` puts the pairs of one prompt in the same batches, sorted by length: little
  padding, and the answer several pairs share (AlpacaEval compares most answers with one reference answer, so
  48,000 (prompt, answer) sequences hold only about 23,000 distinct ones) meets itself in a batch.
* :class:`DedupPreferenceCollator` encodes each distinct sequence of a batch once; :class:`PairRewardTrainer`
  scores those and hands TRL's loss the scores of every (chosen, rejected) slot. Identical inputs score
  identically (without dropout, TRL's default), so the loss and its gradients are those of the full batch.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from transformers.modeling_outputs import SequenceClassifierOutput
from trl import RewardTrainer
from trl.trainer.utils import pad

# The collator's key for where each (chosen..., rejected...) slot's sequence sits among the distinct sequences.
SEQUENCE_INDEX = "sequence_index"
# Prompt groups are sorted by length within windows of this many batches, so that a batch pads little.
WINDOW_BATCHES = 50


def prompt_grouped_order(
    groups: Sequence[Any], lengths: Sequence[int], batch_size: int, seed: int
) -> list[int]:
    """A training order of pair indices, cut by the Trainer into batches of ``batch_size``: each group's pairs
    (the pairs of one prompt) consecutive and sorted by length, groups in random order and then sorted by mean
    length within windows of WINDOW_BATCHES batches (so a batch pads little), and the full batches shuffled (so
    lengths do not drift through a window); the last, partial batch stays last. The same seed, the same order."""
    members: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    rng = random.Random(seed)
    shuffled = list(members.values())
    rng.shuffle(shuffled)
    window = WINDOW_BATCHES * batch_size
    order: list[int] = []
    start = 0
    while start < len(shuffled):
        taken, size = [], 0
        while start < len(shuffled) and size < window:
            taken.append(sorted(shuffled[start], key=lambda i: lengths[i]))
            size += len(taken[-1])
            start += 1
        taken.sort(key=lambda g: sum(lengths[i] for i in g) / len(g))
        order += [i for g in taken for i in g]
    full = len(order) - len(order) % batch_size
    batches = [order[b : b + batch_size] for b in range(0, full, batch_size)]
    rng.shuffle(batches)
    return [i for batch in batches for i in batch] + order[full:]


class PromptGroupedSampler(torch.utils.data.Sampler[int]):
    """Yields :func:`prompt_grouped_order`, reshuffled each epoch (seeded by seed and epoch)."""

    def __init__(self, groups: Sequence[Any], lengths: Sequence[int], batch_size: int, seed: int) -> None:
        self.groups, self.lengths, self.batch_size, self.seed = list(groups), list(lengths), batch_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[int]:
        seed = self.seed * 1_000_003 + self.epoch
        return iter(prompt_grouped_order(self.groups, self.lengths, self.batch_size, seed))


class DedupPreferenceCollator:
    """Pads the distinct sequences of a batch of ``chosen_ids`` / ``rejected_ids`` rows as TRL's collator pads,
    and says where each slot's sequence is (``sequence_index``: the chosen slots, then the rejected ones, in the
    order TRL's collator stacks them)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pad_token_id, self.pad_to_multiple_of = pad_token_id, pad_to_multiple_of

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        slots = [tuple(e["chosen_ids"]) for e in examples] + [tuple(e["rejected_ids"]) for e in examples]
        position: dict[tuple[int, ...], int] = {}
        index = [position.setdefault(s, len(position)) for s in slots]
        distinct = [torch.tensor(s) for s in position]
        multiple = self.pad_to_multiple_of
        masks = [torch.ones_like(s) for s in distinct]
        return {
            "input_ids": pad(distinct, self.pad_token_id, "right", pad_to_multiple_of=multiple),
            "attention_mask": pad(masks, 0, "right", pad_to_multiple_of=multiple),
            SEQUENCE_INDEX: torch.tensor(index),
        }


class PairRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer that scores each distinct sequence of a batch once (with :class:`DedupPreferenceCollator`)
    and, given ``prompt_groups``, trains in :func:`prompt_grouped_order`. Loss and logged metrics are TRL's."""

    def __init__(
        self,
        *args: Any,
        prompt_groups: Sequence[Any] | None = None,
        lengths: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        self.prompt_groups, self.pair_lengths = prompt_groups, lengths
        super().__init__(*args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        index = inputs.pop(SEQUENCE_INDEX, None)
        if index is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        distinct = model(**inputs, use_cache=False).logits
        slots = SequenceClassifierOutput(logits=distinct[index])

        def scored_slots(**_: Any) -> SequenceClassifierOutput:
            return slots

        # TRL's loss and metrics on the (chosen..., rejected...) slots; its token count is the distinct tokens run.
        return super().compute_loss(scored_slots, inputs, return_outputs, num_items_in_batch)

    def _get_train_sampler(self, train_dataset=None):
        if self.prompt_groups is None:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if len(dataset) != len(self.prompt_groups):
            raise ValueError(
                f"group_by_prompt: the training set has {len(dataset)} rows but {len(self.prompt_groups)} prompt "
                "groups (TRL dropped rows longer than max_length); encode pairs within max_length"
            )
        return PromptGroupedSampler(
            self.prompt_groups,
            self.pair_lengths or [0] * len(dataset),
            self.args.train_batch_size,
            self.args.seed,
        )
