"""Guidance search: successive halving over fixed texts finds what helps across prompts, validated on others."""

from __future__ import annotations

import json

import pytest

from alignpro_plugins.cli import main
from trainers.guidance_search_config import GuidanceSearchConfig
from trainers.guidance_search_trainer import (
    GuidanceSearchResult,
    GuidanceSearchTrainer,
    recombinations,
    sentences,
)
from trainers.sft_config import AlignProSFTConfig

SEEDS = [
    "Answer in detail. Give concrete examples.",
    "End with a short summary.",
    "Use a numbered list.",
]
PROMPTS = [f"question {i} about tea" for i in range(40)]
VALIDATION = [f"held-out question {i}" for i in range(8)]


def keyword_reward(prompts, answers):
    """An echoing target shows x + guidance: texts asking for both examples and a summary score best."""
    return [float("examples" in a) + float("summary" in a) - 0.3 * float("list" in a) for a in answers]


def echo(prompt: str) -> str:
    return prompt


def config(tmp_path, **kw) -> GuidanceSearchConfig:
    return GuidanceSearchConfig(
        **{"output_dir": str(tmp_path / "search"), "seed_texts": SEEDS, "min_prompts": 4, **kw}
    )


def test_recombinations_are_seeds_sentences_and_extensions():
    assert sentences("One. Two!  Three?") == ["One.", "Two!", "Three?"]
    texts = dict(recombinations(SEEDS))
    assert list(texts)[:3] == SEEDS  # the seeds come first, unchanged
    assert texts["Give concrete examples."] == "sentence of seed 0"
    assert texts["Answer in detail. Give concrete examples. End with a short summary."] == (
        "seed 0 + sentence of seed 1"
    )
    # A seed is never extended by its own sentences, and no text appears twice.
    assert "Answer in detail. Give concrete examples. Give concrete examples." not in texts
    assert len(texts) == len(recombinations(SEEDS))


def test_search_finds_a_recombined_text_that_beats_every_seed(tmp_path):
    trainer = GuidanceSearchTrainer(
        config(tmp_path, validation_prompts=8),
        prompts=PROMPTS,
        validation_prompts=VALIDATION,
        target=echo,
        reward=keyword_reward,
    )
    pool = len(trainer.candidates())
    result = trainer.search()
    assert "examples" in result.best and "summary" in result.best and "list" not in result.best
    assert result.best not in SEEDS
    assert result.chosen_on == "validation" and result.validation_prompts == 8
    # Successive halving: each rung sees twice the prompts and keeps at most half the candidates.
    # The finalists (3) take all the remaining prompts in one last rung.
    sizes = [r["prompts"] for r in result.rungs]
    assert sizes[:-1] == [4, 8, 16, 32][: len(sizes) - 1] and sizes[-1] == len(PROMPTS)
    counts = [r["candidates"] for r in result.rungs]
    assert all(b == max(3, -(-a // 2)) for a, b in zip(counts, counts[1:], strict=False)) and counts[-1] == 3
    # ... which costs far fewer target calls than every candidate on every prompt.
    assert result.target_calls < pool * len(PROMPTS) / 2
    rows = {c["text"]: c for c in result.candidates}
    assert rows[""]["origin"] == "no change" and rows[""]["prompts_scored"] == len(PROMPTS)
    assert rows[result.best]["validation_mean"] == pytest.approx(2.0)
    assert rows[result.best]["gain_over_no_change"] == pytest.approx(2.0)
    assert rows[result.best]["win_rate_over_no_change"] == 1.0
    assert rows["Use a numbered list."]["dropped_after_rung"] == 0  # the worst text leaves first
    # The result is plain JSON beside the answer cache, and loads back as it was.
    saved = tmp_path / "search" / "guidance_search.json"
    assert json.loads(saved.read_text())["best"] == result.best
    assert GuidanceSearchResult.load(tmp_path / "search") == result
    assert result.ranked(1) == [result.best]


def test_no_change_wins_when_every_text_hurts(tmp_path):
    def shorter_is_better(prompts, answers):
        return [-float(len(a) - len(p)) for p, a in zip(prompts, answers, strict=True)]

    result = GuidanceSearchTrainer(
        config(tmp_path, recombine=False), prompts=PROMPTS, target=echo, reward=shorter_is_better
    ).search()
    assert result.best == ""
    # Without validation data, validation prompts are held out of the search prompts.
    assert result.validation_prompts == 20 and result.search_prompts == 20
    assert "" not in result.ranked()


def test_sft_scores_the_searched_texts_first(tmp_path, tiny_lm_dir):
    from trainers.sft_trainer import AlignProSFTTrainer

    result = GuidanceSearchTrainer(
        config(tmp_path), prompts=PROMPTS, validation_prompts=VALIDATION, target=echo, reward=keyword_reward
    ).search()

    def sft(source: str):
        return AlignProSFTConfig(
            output_dir=str(tmp_path / "sft"),
            base_model=tiny_lm_dir,
            templates=["Use a numbered list."],
            templates_from=source,
            templates_from_top=2,
            num_candidates=0,
            report_to="none",
        )

    # Read when the trainer starts, not when the config is built: a recipe runs the search first.
    cfg = sft(str(tmp_path / "not-yet"))
    with pytest.raises(FileNotFoundError, match="holds no guidance_search.json: give the output_dir"):
        AlignProSFTTrainer(cfg, prompts=PROMPTS, target=echo, reward=keyword_reward)
    cfg = sft(str(tmp_path / "search"))
    trainer = AlignProSFTTrainer(cfg, prompts=PROMPTS[:3], target=echo, reward=keyword_reward)
    assert cfg.templates[0] == result.best and len(cfg.templates) == 3
    assert cfg.templates[-1] == "Use a numbered list."
    # The bootstrap scores them: with the echoing target, the searched text is every prompt's best candidate.
    assert [y for _, y in trainer.sft_pairs()] == [result.best] * 3


STEADY_OR_WIDE = ["Add many examples.", "Be clear."]


def spread_reward(prompts, answers):
    """Prompts differ in difficulty (i % 3). "Add many examples." lifts even prompts by 2 and sinks odd ones by 1
    (mean gain +0.5, wide); "Be clear." lifts every prompt by 0.3 (mean gain +0.3, no extra spread)."""
    out = []
    for p, a in zip(prompts, answers, strict=True):
        i = int(p.split()[-3]) if p.split()[-3].isdigit() else 0
        r = float(i % 3)
        if "examples" in a:
            r += 2.0 if i % 2 == 0 else -1.0
        if "clear" in a:
            r += 0.3
        out.append(r)
    return out


@pytest.mark.parametrize(
    "objective, best",
    [("mean", "Add many examples."), ("mean_minus_std", "Be clear."), ("win_rate", "Be clear.")],
)
def test_objective_decides_between_a_wide_gain_and_a_steady_one(tmp_path, objective, best):
    result = GuidanceSearchTrainer(
        config(
            tmp_path, seed_texts=STEADY_OR_WIDE, recombine=False, objective=objective, validation_prompts=0
        ),
        prompts=PROMPTS,
        target=echo,
        reward=spread_reward,
    ).search()
    assert result.best == best
    assert result.provenance["objective"] == objective
    rows = {c["text"]: c for c in result.candidates}
    wide, steady = rows["Add many examples."], rows["Be clear."]
    assert wide["gain_over_no_change"] == pytest.approx(0.5) and steady[
        "gain_over_no_change"
    ] == pytest.approx(0.3)
    # The variance ratio against "no change" on the same prompts is what the risk-averse objective trades.
    assert steady["variance_ratio_over_no_change"] == pytest.approx(1.0)
    assert wide["variance_ratio_over_no_change"] > 2
    assert steady["win_rate_over_no_change"] == 1.0 and wide["win_rate_over_no_change"] == 0.5
    # ranked() follows the objective too, so `sft --templates_from` distils the text the objective chose.
    assert result.ranked(1) == [best]


def test_win_rate_objective_is_picked_on_validation_against_no_change(tmp_path):
    found = GuidanceSearchTrainer(
        config(
            tmp_path, seed_texts=STEADY_OR_WIDE, recombine=False, objective="win_rate", validation_prompts=8
        ),
        prompts=PROMPTS,
        validation_prompts=[f"held-out question {i} about tea" for i in range(8)],
        target=echo,
        reward=spread_reward,
    ).search()
    rows = {c["text"]: c for c in found.candidates}
    assert found.best == "Be clear." and found.chosen_on == "validation"
    assert rows["Be clear."]["validation_score"] == 1.0 and rows[""]["validation_score"] == 0.5
    assert rows["Add many examples."]["validation_score"] == 0.5
    assert rows["Be clear."]["validation_win_rate_over_no_change"] == 1.0


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(objective="median"), "objective must be one of mean, win_rate, mean_minus_std; got 'median'"),
        (dict(risk_aversion=-1.0), "risk_aversion must be >= 0"),
        (dict(keep_fraction=1.0), "keep_fraction must be in \\(0, 1\\), got 1.0"),
        (dict(min_prompts=0), "min_prompts must be >= 1"),
        (dict(finalists=0), "finalists must be >= 1"),
        (dict(seed_texts=["  "]), "seed_texts needs at least one non-empty guidance text"),
    ],
)
def test_bad_config_is_refused_with_what_is_accepted(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        GuidanceSearchConfig(**{"output_dir": str(tmp_path), **kw})


def test_search_needs_prompts_and_a_reward(tmp_path):
    with pytest.raises(ValueError, match="needs training prompts: set prompts_data"):
        GuidanceSearchTrainer(config(tmp_path), target=echo, reward=keyword_reward)
    with pytest.raises(ValueError, match="reward"):
        GuidanceSearchTrainer(config(tmp_path), prompts=PROMPTS, target=echo)


def test_cli_runs_the_search_on_files_with_a_reward_model(tmp_path, tiny_encoder_dir, tiny_lm_dir, capsys):
    """End to end on files: a reward-model folder and a local target model, as `alignpro guidance` runs it."""
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"instruction": x}) + "\n" for x in PROMPTS[:8]))
    from trainers.reward_config import AlignProRewardConfig
    from trainers.reward_trainer import train_reward

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(
        "".join(
            json.dumps({"prompt": x, "chosen": "a detailed answer with examples", "rejected": "no"}) + "\n"
            for x in PROMPTS
        )
    )
    train_reward(
        AlignProRewardConfig(
            output_dir=str(tmp_path / "rm"),
            base_model=tiny_encoder_dir,
            preference_data=str(prefs),
            max_steps=1,
            report_to="none",
        )
    )
    argv = [
        "guidance",
        "--output_dir",
        str(tmp_path / "g"),
        "--prompts_data",
        str(data),
        "--reward_model",
        str(tmp_path / "rm"),
        "--target",
        tiny_lm_dir,
        "--target_max_new_tokens",
        "4",
        "--seed_texts",
        *SEEDS[:2],
        "--min_prompts",
        "2",
        "--validation_prompts",
        "2",
    ]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = GuidanceSearchResult.load(tmp_path / "g")
    assert printed == {"best": result.best, "chosen_on": "validation"}
    assert result.search_prompts == 6 and result.validation_prompts == 2
    assert result.provenance["reward_model"] == str(tmp_path / "rm")
    assert result.provenance["target_settings"]["max_new_tokens"] == 4
    assert (tmp_path / "g" / "target_cache.jsonl").exists()
