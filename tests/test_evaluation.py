"""Evaluation harness: baselines are built as described, statistics are paired, runs resume."""

from __future__ import annotations

import json
import math

import pytest

from alignpro_plugins import stats
from alignpro_plugins.evaluation import (
    BestOfK,
    BestOfN,
    Evaluator,
    FixedTemplate,
    FrozenAlone,
    Oracle,
    PairwiseLLMJudge,
    TargetInput,
    WithPrompter,
    WithRetryGate,
    retry_threshold,
)
from alignpro_plugins.guidance import DEFAULT_TEMPLATE
from alignpro_plugins.prompter import Prompter
from alignpro_plugins.rewards import CallableReward
from alignpro_plugins.targets import CachedTarget, CallableTarget, FrozenTarget

PROMPTS = ["write a poem", "explain tea", "list numbers", "give examples"]


def echo_target():
    return CallableTarget(lambda x: x, name="echo")


def length_judge():
    return CallableReward(lambda ps, ans: [float(len(a)) for a in ans], name="length")


def test_template_is_appended_to_the_prompt():
    (row,) = FixedTemplate().inputs(["hi there"])
    assert row[0].text == f"hi there\n\n{DEFAULT_TEMPLATE}"
    (row,) = FixedTemplate(template="Be brief.").inputs(["q"])
    assert row[0].text.endswith("Be brief.") and row[0].text.startswith("q")


def test_zero_shot_uses_untrained_prompter(tiny_lm_dir):
    zero = Prompter.from_base(tiny_lm_dir, similarity=None)
    assert not hasattr(zero.model, "peft_config")
    rows = WithPrompter(prompter=zero, name="zero-shot").inputs(PROMPTS[:2])
    for x, (inp,) in zip(PROMPTS[:2], rows, strict=True):
        assert inp.text == x or inp.text.startswith(x)  # augment keeps x verbatim; fallback passes it through


def test_best_of_k_draws_the_same_rewrites_from_its_seed_and_leaves_the_callers_rng_alone():
    import torch

    from tests.test_prompter import make_prompter, varied_lm

    prompter = make_prompter(*varied_lm())

    def draw(cfg):
        return [[i.generated for i in row] for row in cfg.inputs(PROMPTS[:3])]  # before the guard

    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = draw(BestOfK(prompter=prompter, k=3))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    torch.manual_seed(7)
    assert draw(BestOfK(prompter=prompter, k=3)) == first
    other = draw(BestOfK(prompter=prompter, k=3, seed=1))
    assert other != first  # another seed, other samples
    torch.manual_seed(5)
    unseeded = draw(BestOfK(prompter=prompter, k=3, seed=None))
    assert not torch.equal(
        torch.random.get_rng_state(), torch.manual_seed(5).get_state()
    )  # the global RNG drew
    assert draw(BestOfK(prompter=prompter, k=3, seed=None)) == unseeded  # ... from where the caller seeded it
    fingerprints = {
        BestOfK(prompter=prompter, **kw).fingerprint() for kw in ({}, {"seed": 1}, {"temperature": 1.0})
    }
    assert len(fingerprints) == 3  # records drawn under another seed or temperature are not resumed


def test_best_of_k_picks_the_maximum(tiny_lm_dir, tmp_path, monkeypatch):
    prompter = Prompter.from_base(tiny_lm_dir, similarity=None)
    prompter.manifest.generation.max_new_tokens = 12
    cfg = BestOfK(prompter=prompter, k=4)
    decode_loops: list[int] = []
    real_generate = prompter.model.generate

    def generate(*args, **kwargs):
        decode_loops.append(kwargs["num_return_sequences"])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(prompter.model, "generate", generate)
    calls: list[list[str]] = []

    def judge(ps, answers):
        calls.append(list(answers))
        return [float(len(a)) for a in answers]

    ev = Evaluator(
        PROMPTS[:2], echo_target(), {"len": CallableReward(judge)}, out_dir=tmp_path, reference="best-of-k"
    )
    report = ev.run([cfg])
    scored = [a for call in calls for a in call]
    assert len(scored) == 2 * 4  # K candidates per prompt were answered and scored, each once
    assert decode_loops == [4]  # all K drawn in one generate call, not K calls
    for rec in report.records:
        mine = [a for a in scored if a.startswith(rec["prompt"])]  # the echo target answers with the input
        assert rec["k"] == 4 and len(mine) == 4
        assert rec["rewards"]["len"] == max(len(a) for a in mine)
        assert [c["rewards"]["len"] for c in rec["candidates"]] == [float(len(a)) for a in mine]
        assert rec["candidates"][rec["kept"]]["rewards"] == rec["rewards"]


def test_paired_statistics_and_report(tmp_path):
    ev = Evaluator(
        PROMPTS,
        echo_target(),
        {"reward": length_judge(), "independent": length_judge()},
        out_dir=tmp_path,
        focus="template",
    )
    report = ev.run([FrozenAlone(), FixedTemplate()])
    s = report.summary
    assert s["configs"]["template"]["reward"]["vs_reference"]["win_rate"] == 1.0  # appended text is longer
    h2h = s["head_to_head"]["frozen"]["independent"]
    assert h2h["win_rate"] == 1.0 and h2h["n"] == len(PROMPTS)
    # Paired mean difference = the appended template's length, on every prompt.
    added = [
        len(inp[0].text) - len(x) for x, inp in zip(PROMPTS, FixedTemplate().inputs(PROMPTS), strict=True)
    ]
    assert h2h["mean_diff"] == pytest.approx(sum(added) / len(added)) and min(added) > 0
    assert h2h["mean_diff_ci"][0] <= h2h["mean_diff"] <= h2h["mean_diff_ci"][1]
    assert "mean difference (independent)" in (tmp_path / "results.md").read_text()
    # Appending one text adds the same length to every answer: the spread across prompts is unchanged.
    vr = s["configs"]["template"]["independent"]["variance_ratio_vs_reference"]
    assert (
        vr["ratio"] == pytest.approx(1.0) and vr["ci_low"] == pytest.approx(1.0) and vr["n"] == len(PROMPTS)
    )
    assert "(×1.00 [1.00–1.00])" in (tmp_path / "results.md").read_text()
    # The focus is not compared with itself.
    assert "| template |" not in (tmp_path / "results.md").read_text().split("Head to head")[1]
    assert (tmp_path / "reward_distributions.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["records"]) == 2 * len(PROMPTS)


def test_win_rate_pairs_by_prompt_and_counts_ties_half():
    a, b = [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 0.0]
    assert stats.win_indicators(a, b) == [0.5, 0.0, 1.0, 1.0]
    wr = stats.win_rate(a, b)
    assert wr["win_rate"] == pytest.approx(0.625) and wr["ci_low"] <= 0.625 <= wr["ci_high"]
    with pytest.raises(ValueError):
        stats.win_indicators([1.0], [1.0, 2.0])
    d = stats.mean_difference(a, b)
    assert d["mean_diff"] == pytest.approx(1.0) and d["n"] == 4 and d["ci_low"] <= 1.0 <= d["ci_high"]
    assert stats.gap_closed(1.0, 2.0, 3.0) == pytest.approx(0.5)
    assert math.isnan(stats.gap_closed(1.0, 0.5, 0.9))  # an oracle below frozen leaves no gap to close


def test_variance_ratio_is_paired_and_its_interval_covers_noise():
    import random

    rng = random.Random(1)
    b = [rng.gauss(0, 1) for _ in range(200)]
    # Doubling every reward quadruples the variance on every resample of the prompts.
    doubled = stats.variance_ratio([2 * x for x in b], b)
    assert doubled["ratio"] == pytest.approx(4.0) and doubled["ci_low"] == pytest.approx(4.0)
    # Two draws from one distribution: the ratio is near 1 and its interval says that 1 is not ruled out.
    a = [rng.gauss(0, 1) for _ in range(200)]
    same = stats.variance_ratio(a, b)
    assert same["ci_low"] < 1 < same["ci_high"] and 0.6 < same["ratio"] < 1.6
    assert math.isnan(stats.variance_ratio([1.0], [2.0])["ratio"])
    assert math.isnan(stats.variance_ratio([1.0, 2.0], [3.0, 3.0])["ratio"])  # no spread to compare with
    with pytest.raises(ValueError, match="equal lengths"):
        stats.variance_ratio([1.0, 2.0], [1.0])


def test_length_controlled_win_rate_removes_a_pure_length_preference():
    import random

    rng = random.Random(1)
    len_a = [rng.randint(60, 130) for _ in range(120)]  # a answers longer on average
    len_b = [rng.randint(20, 100) for _ in range(120)]
    # A judge that only counts words: raw win rate well above half, at equal length no preference.
    raw = stats.win_rate(len_a, len_b)["win_rate"]
    lc = stats.length_controlled_win_rate(len_a, len_b, len_a, len_b)
    assert raw > 0.7 and abs(lc["win_rate"] - 0.5) < 0.1 and lc["length_coef"] > 1
    assert lc["ci_low"] < 0.5 < lc["ci_high"]
    # A judge blind to length that prefers a on 3 prompts in 4: the win rate survives length control.
    quality = [float(i % 4 != 0) for i in range(120)]
    lc = stats.length_controlled_win_rate(quality, [0.5] * 120, len_a, len_b)
    assert lc["win_rate"] == pytest.approx(0.75, abs=0.05) and abs(lc["length_coef"]) < 0.5
    with pytest.raises(ValueError, match="answer lengths"):
        stats.length_controlled_win_rate([1.0], [0.0], [1, 2], [1])
    # One length difference everywhere (e.g. a fixed template): no length effect to separate out.
    same = stats.length_controlled_win_rate([1.0, 0.0, 1.0], [0.0] * 3, [5, 5, 5], [2, 2, 2])
    assert same["win_rate"] == pytest.approx(5 / 6)  # ties count half and math.isnan(same["length_coef"])
    assert math.isnan(stats.length_controlled_win_rate([], [], [], [])["win_rate"])
    # Length separates wins from losses completely: the fit stays finite.
    sep = stats.length_controlled_win_rate([1.0, 0.0] * 20, [0.5] * 40, [90, 10] * 20, [50] * 40, n_boot=50)
    assert all(math.isfinite(sep[k]) for k in ("win_rate", "ci_low", "ci_high", "length_coef"))


def test_report_shows_answer_length_and_the_length_controlled_win_rate(tmp_path):
    ev = Evaluator(PROMPTS, echo_target(), {"reward": length_judge()}, out_dir=tmp_path)
    s = ev.run([FrozenAlone(), FixedTemplate()]).summary
    t = s["configs"]["template"]
    extra = len(DEFAULT_TEMPLATE.split())
    assert t["mean_answer_words"] == pytest.approx(s["configs"]["frozen"]["mean_answer_words"] + extra)
    assert 0 <= t["reward"]["vs_reference_length_controlled"]["win_rate"] <= 1
    assert "| answer words |" in (tmp_path / "results.md").read_text()
    assert "| at equal length (reward) |" in (tmp_path / "results.md").read_text()


def test_interrupted_run_resumes_without_regenerating(tmp_path):
    calls = []

    def target(x):
        calls.append(x)
        return x

    ev = Evaluator(
        PROMPTS, CallableTarget(target), {"reward": length_judge()}, out_dir=tmp_path, chunk_size=2
    )
    ev.run([FrozenAlone()])
    n_first = len(calls)
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    (tmp_path / "records.jsonl").write_text("\n".join(lines[:2]) + "\n")  # as if interrupted after one chunk
    report = Evaluator(
        PROMPTS, CallableTarget(target), {"reward": length_judge()}, out_dir=tmp_path, chunk_size=2
    ).run([FrozenAlone()])
    assert len(calls) == n_first + 2 and len(report.records) == len(PROMPTS)


def test_run_killed_mid_write_resumes(tmp_path, caplog):
    calls = []

    def target(x):
        calls.append(x)
        return x

    def run():
        return Evaluator(
            PROMPTS, CallableTarget(target), {"reward": length_judge()}, out_dir=tmp_path, chunk_size=2
        ).run([FrozenAlone()])

    run()
    records = tmp_path / "records.jsonl"
    lines = records.read_text().splitlines()
    records.write_text("\n".join(lines[:2]) + "\n" + lines[2][:25])  # the third row cut off mid-write
    calls.clear()
    report = run()  # used to raise a bare JSONDecodeError
    assert f"{records}:3: skipping a malformed line" in caplog.text
    assert calls == PROMPTS[2:] and len(report.records) == len(PROMPTS)
    # The rows written after the cut-off line are on lines of their own: a third run reuses all of them.
    calls.clear()
    again = run()
    assert calls == [] and again.summary == report.summary


@pytest.mark.parametrize(
    ("content", "rows"),
    [
        (
            {"prompt": ["a", "b"], "context": ["x", ""]},
            [{"prompt": "a", "context": "x"}, {"prompt": "b", "context": ""}],
        ),
        ({"data": [{"prompt": "a"}], "version": "2"}, [{"prompt": "a"}]),
        ({"data": [], "version": "2"}, []),
        ({"prompt": "a"}, [{"prompt": "a"}]),
        ([{"prompt": "a"}], [{"prompt": "a"}]),
    ],
    ids=["columns", "wrapped", "wrapped-empty", "one-object", "list"],
)
def test_json_prompt_files_in_each_layout(tmp_path, content, rows):
    from alignpro_plugins.data import read_records

    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(content))
    assert read_records(path) == rows


def test_column_oriented_evaluation_prompts(tmp_path):
    from alignpro_plugins.data import load_prompts

    path = tmp_path / "eval.json"  # e.g. pandas DataFrame.to_json(orient="list")
    path.write_text(
        json.dumps({"instruction": ["write a poem", "explain tea"], "context": ["", "green tea"]})
    )
    # Before: the first column was taken as the rows ("row 0: expected an object, got str").
    assert load_prompts(str(path), field="instruction", context_field="context") == [
        "write a poem",
        "explain tea\n\ngreen tea",
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"prompt": ["a", "b"], "context": ["x"]}, "column-oriented JSON needs columns of equal length"),
        ({"prompt": ["a", "b"], "source": "dolly"}, "expected a list of objects, an object holding one"),
    ],
)
def test_unusable_json_object_names_the_file(tmp_path, content, message):
    from alignpro_plugins.data import DataError, read_records

    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value).startswith(f"{path}: {message}")


def test_oracle_uses_its_own_target_and_gap_closed(tmp_path):
    oracle = CallableTarget(lambda x: x + " with a much longer answer", name="oracle")
    ev = Evaluator(PROMPTS, echo_target(), {"reward": length_judge()}, out_dir=tmp_path, focus="template")
    report = ev.run([FrozenAlone(), FixedTemplate(template="more"), Oracle(target=oracle)])
    assert report.summary["gap_closed"]["reward"] == pytest.approx(6 / 26)


def test_pairwise_llm_judge_runs_both_orders():
    seen = []

    def judge(prompt: str) -> str:
        seen.append(prompt)
        a = prompt.split("Response A:\n")[1].split("\n\nResponse B:")[0]
        return "A" if "good" in a else "B"

    scores = PairwiseLLMJudge(CallableTarget(judge)).prefer(["q", "q"], ["good", "bad"], ["bad", "good"])
    assert scores == [1.0, 0.0] and len(seen) == 4


def test_unknown_reference_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="reference"):
        Evaluator(PROMPTS, echo_target(), {"r": length_judge()}).run([FixedTemplate()])


def test_resume_ignores_records_of_a_changed_configuration(tmp_path):
    calls = []

    def target(x):
        calls.append(x)
        return x

    Evaluator(PROMPTS, CallableTarget(target), {"reward": length_judge()}, out_dir=tmp_path).run(
        [FrozenAlone(), FixedTemplate(template="Be brief.")]
    )
    n = len(calls)
    report = Evaluator(PROMPTS, CallableTarget(target), {"reward": length_judge()}, out_dir=tmp_path).run(
        [FrozenAlone(), FixedTemplate(template="Be thorough.")]
    )
    assert len(calls) == n + len(PROMPTS)  # frozen reused, the changed template re-run
    assert all(r["input"].endswith("Be thorough.") for r in report.records if r["config"] == "template")


def test_resume_ignores_records_of_another_target_or_judge(tmp_path):
    calls = []

    def target(x):
        calls.append(x)
        return x

    def run(target_name: str, judge: CallableReward):
        return Evaluator(
            PROMPTS, CallableTarget(target, name=target_name), {"reward": judge}, out_dir=tmp_path
        ).run([FrozenAlone()])

    run("model-a", length_judge())
    run("model-a", length_judge())
    assert len(calls) == len(PROMPTS)  # the same target and judge: every record resumed
    run("model-b", length_judge())
    assert len(calls) == 2 * len(PROMPTS)  # another target answered: none of model-a's records apply
    words = CallableReward(lambda ps, ans: [float(len(a.split())) for a in ans], name="words")
    report = run("model-b", words)
    assert len(calls) == 3 * len(PROMPTS)  # another judge under the same name: scored afresh
    assert [r["rewards"]["reward"] for r in report.records] == [float(len(x.split())) for x in PROMPTS]


def test_a_reward_model_retrained_in_place_is_another_judge(tiny_encoder_dir, tmp_path):
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification

    from alignpro_plugins.rewards import RewardModel

    folder = tmp_path / "reward"
    shutil.copytree(tiny_encoder_dir, folder)
    before = RewardModel(str(folder)).identity
    assert RewardModel(str(folder)).identity == before  # the same weights: the same judge
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), num_labels=1)
    with torch.no_grad():
        model.classifier.bias.add_(1.0)
    model.save_pretrained(str(folder))  # what a second reward stage with the same output_dir does
    after = RewardModel(str(folder))
    assert after.identity != before and after.identity.startswith(f"reward-model:{folder}@")


def test_bootstrap_library_contains_the_template_baseline():
    # Training starts where the `template` baseline is: its instruction is one of the bootstrap's candidates.
    from trainers.sft_config import AlignProSFTConfig

    assert DEFAULT_TEMPLATE in AlignProSFTConfig(output_dir="unused").templates
    assert FixedTemplate().template == DEFAULT_TEMPLATE


def test_grown_prompt_set_reuses_records_by_prompt(tmp_path):
    calls = []

    def target(x):
        calls.append(x)
        return x

    Evaluator(PROMPTS[1:], CallableTarget(target), {"reward": length_judge()}, out_dir=tmp_path).run(
        [FrozenAlone()]
    )
    calls.clear()
    # One new prompt in front shifts every position; the old records still apply to their prompts.
    report = Evaluator(PROMPTS, CallableTarget(target), {"reward": length_judge()}, out_dir=tmp_path).run(
        [FrozenAlone()]
    )
    assert calls == [PROMPTS[0]]
    assert [r["prompt"] for r in sorted(report.records, key=lambda r: r["idx"])] == PROMPTS


def test_judge_trained_on_evaluation_prompts_is_reported(tmp_path, caplog):
    from alignpro_plugins.rewards import prompt_digest

    seen_judge = length_judge()
    seen_judge.meta = {"train_prompt_digests": [prompt_digest(PROMPTS[1]), prompt_digest("not evaluated")]}
    clean_judge = length_judge()
    clean_judge.meta = {"train_prompt_digests": [prompt_digest("not evaluated")]}
    judges = {"reward": seen_judge, "independent": clean_judge, "plain": length_judge()}
    with caplog.at_level("WARNING"):
        report = Evaluator(PROMPTS, echo_target(), judges, out_dir=tmp_path).run(
            [FrozenAlone(), FixedTemplate()]
        )
    # a judge without digests is not claimed clean: it is left out
    assert report.summary["judge_trained_on_prompts"] == {"reward": 1, "independent": 0}
    assert "reward (1 of 4)" in report.to_markdown() and "independent (" not in report.to_markdown()
    assert "'reward' trained on preference pairs for 1 of the 4" in caplog.text


def _counting_echo(asked: list[str]):
    def fn(x: str) -> str:
        asked.append(x)
        return x

    return CallableTarget(fn, name="echo")


def test_gated_retry_asks_again_only_below_the_threshold_and_keeps_the_best(tmp_path):
    asked: list[str] = []
    # Lengths of the echoed prompts: 12, 11, 12, 13; only the 13-character one is at or above 12.5.
    cfg = WithRetryGate(retry=[FixedTemplate(template="Be thorough.")], threshold=12.5)
    ev = Evaluator(
        PROMPTS, _counting_echo(asked), {"len": length_judge()}, out_dir=tmp_path, reference="frozen"
    )
    report = ev.run([FrozenAlone(), cfg])
    rows = {r["prompt"]: r for r in report.records if r["config"] == "gated-retry"}
    retried = [x for x in PROMPTS if len(x) < 12.5]
    assert [a for a in asked if a.endswith("Be thorough.")] == [f"{x}\n\nBe thorough." for x in retried]
    for x in PROMPTS:
        if x in retried:
            assert rows[x]["k"] == 2 and rows[x]["answer"] == f"{x}\n\nBe thorough."  # the longer answer won
            assert rows[x]["rewrite"] == "Be thorough."
        else:
            assert rows[x]["k"] == 1 and rows[x]["answer"] == x and rows[x]["rewrite"] is None
    assert report.summary["configs"]["gated-retry"]["target_calls_per_prompt"] == pytest.approx(1 + 3 / 4)
    assert "| gated-retry | 1.75 |" in report.to_markdown()


def test_gated_retry_keeps_the_first_answer_when_the_retry_scores_no_better(tmp_path):
    shorter_is_better = CallableReward(lambda ps, ans: [-float(len(a)) for a in ans], name="short")
    cfg = WithRetryGate(retry=[FixedTemplate(), FixedTemplate(template="More.", name="more")], threshold=0.0)
    report = Evaluator(PROMPTS, echo_target(), {"short": shorter_is_better}, reference="gated-retry").run(
        [cfg]
    )
    for rec in report.records:
        assert rec["k"] == 3  # every answer scored below 0: both retry inputs were asked
        assert rec["answer"] == rec["prompt"] and rec["rewrite"] is None


def test_gated_retry_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="at least one retry configuration"):
        WithRetryGate()
    with pytest.raises(ValueError, match="shared target"):
        WithRetryGate(retry=[Oracle(target=echo_target())])
    with pytest.raises(ValueError, match="NaN"):
        WithRetryGate(retry=[FixedTemplate()], threshold=float("nan"))


def test_gate_and_rerank_fingerprints_are_those_their_stored_records_carry():
    # Values computed by the code that wrote the stored benchmark records (GatedRetry, commit 0015c10): a changed
    # fingerprint would make every gated and rerank record be answered again.
    t, more = FixedTemplate(), FixedTemplate(template="More.", name="more")
    assert WithRetryGate(retry=[t], threshold=0.5).fingerprint() == "6ecc4fa3d4bb9c56"
    assert WithRetryGate(retry=[t, more], threshold=-1.25, name="g2", description="d").fingerprint() == (
        "0be0d8b7a7055021"
    )
    assert WithRetryGate(retry=[t], threshold=float("-inf")).fingerprint() == "e6662764e4a7d477"
    assert WithRetryGate.rerank([t]).fingerprint() == "99149f00eabc4af0"
    assert (
        WithRetryGate.rerank([t, more], name="rerank-3", description="x").fingerprint() == "e8b44b68d35f9fb3"
    )


def test_gated_retry_keeps_the_best_of_several_retries_and_scores_each_answer_once_per_judge():
    calls: list[int] = []

    def longer(ps, ans):
        calls.append(len(ans))
        return [float(len(a)) for a in ans]

    cfg = WithRetryGate(
        retry=[FixedTemplate(template="Be."), FixedTemplate(template="Be very thorough.", name="t2")],
        threshold=12.5,
    )
    report = Evaluator(PROMPTS, echo_target(), {"len": CallableReward(longer, name="len")}).run(
        [FrozenAlone(), cfg]
    )
    rows = {r["prompt"]: r for r in report.records if r["config"] == "gated-retry"}
    assert rows["write a poem"]["k"] == 3 and rows["write a poem"]["rewrite"] == "Be very thorough."
    assert rows["give examples"]["k"] == 1  # 13 characters: not below the threshold
    # frozen's answers, the gate's first answers, then one call for the three retried prompts' six answers.
    assert calls == [4, 4, 6]


def test_gated_retry_records_are_not_reused_under_another_threshold(tmp_path):
    asked: list[str] = []
    judges = {"len": length_judge()}
    Evaluator(PROMPTS, _counting_echo(asked), judges, out_dir=tmp_path, reference="gated-retry").run(
        [WithRetryGate(retry=[FixedTemplate()], threshold=0.0)]
    )
    assert len(asked) == len(PROMPTS)  # nothing scored below 0
    Evaluator(PROMPTS, _counting_echo(asked), judges, out_dir=tmp_path, reference="gated-retry").run(
        [WithRetryGate(retry=[FixedTemplate()], threshold=100.0)]
    )
    assert len(asked) == 3 * len(PROMPTS)  # a new threshold: every prompt answered again, and retried


def test_retry_threshold_spends_the_given_share():
    scores = [0.5, -1.0, 2.0, 0.0]
    t = retry_threshold(scores, 0.5)
    assert sum(v < t for v in scores) == 2 and -0.0 < t < 0.5
    assert retry_threshold(scores, 0.0) == float("-inf")
    assert retry_threshold(scores, 1.0) == float("inf")
    assert sum(v < retry_threshold(scores, 0.25) for v in scores) == 1
    with pytest.raises(ValueError, match="retry_share"):
        retry_threshold(scores, 1.5)
    with pytest.raises(ValueError, match="at least one"):
        retry_threshold([], 0.5)


def _frozen_artifacts(tiny_lm_dir, tmp_path):
    """Two artifact folders with the same weights and settings, as when an RL stage keeps its SFT round."""
    import shutil

    pr = Prompter.from_base(tiny_lm_dir, similarity=None)
    pr.manifest.generation.max_new_tokens = 8
    sft = pr.save_pretrained(tmp_path / "sft")
    pr.close()
    rl = shutil.copytree(sft, tmp_path / "rl")
    # Another manifest, same behaviour (a recorded training stage would need an adapter: the folder is zero-shot).
    data = json.loads((rl / "alignpro.json").read_text())
    data["provenance"]["copied_from"] = "sft"
    (rl / "alignpro.json").write_text(json.dumps(data))
    return [Prompter.from_pretrained(p, device="cpu", similarity=None) for p in (sft, rl)]


def test_configurations_with_the_same_inputs_are_answered_once(tiny_lm_dir, tmp_path):
    sft, rl = _frozen_artifacts(tiny_lm_dir, tmp_path)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the second prompter with the same weights was asked to rewrite")

    rl.rewrite_results = must_not_run  # type: ignore[method-assign]
    configs = [
        FrozenAlone(),
        WithPrompter(prompter=sft, name="sft"),
        align_pro := WithPrompter(prompter=rl, name="align-pro"),
        FixedTemplate(),
        FixedTemplate(template=DEFAULT_TEMPLATE, name="template-picked"),
        # Retried everywhere, with the rewrites align-pro got from its twin: still no rewrite by rl.
        WithRetryGate(retry=[align_pro], threshold=float("inf")),
    ]
    asked: list[str] = []
    ev = Evaluator(PROMPTS, _counting_echo(asked), {"len": length_judge()}, out_dir=tmp_path / "eval")
    report = ev.run(configs)
    # frozen, sft, template, and the gate's first tries and retries (this target has no cache); not the twins.
    assert len(asked) == 5 * len(PROMPTS)
    rows = {
        name: sorted((r for r in report.records if r["config"] == name), key=lambda r: r["idx"])
        for name in ("sft", "align-pro", "template", "template-picked")
    }
    for twin, source in (("align-pro", "sft"), ("template-picked", "template")):
        assert [(r["input"], r["answer"], r["rewards"]) for r in rows[twin]] == [
            (r["input"], r["answer"], r["rewards"]) for r in rows[source]
        ]
        assert report.summary["configs"][twin]["same_inputs_as"] == source
        assert f"{twin} = {source}" in report.to_markdown()
    assert "same_inputs_as" not in report.summary["configs"]["sft"]
    assert report.summary["head_to_head"]["sft"]["len"]["win_rate"] == 0.5
    # The copied records are written like any other, so a resumed run asks nothing.
    Evaluator(PROMPTS, _counting_echo(asked), {"len": length_judge()}, out_dir=tmp_path / "eval").run(configs)
    assert len(asked) == 5 * len(PROMPTS)
    # A new gate over resumed records: its retries take the rewrites from those records, not from a prompter.
    sft.rewrite_results = must_not_run  # type: ignore[method-assign]
    align_pro = WithPrompter(prompter=rl, name="align-pro")
    regated = WithRetryGate(retry=[align_pro], threshold=1e9, name="regated")
    Evaluator(PROMPTS, _counting_echo(asked), {"len": length_judge()}, out_dir=tmp_path / "eval").run(
        [*configs[:2], align_pro, regated]
    )
    assert len(asked) == 7 * len(PROMPTS)


def test_gated_retry_reuses_the_rewrites_its_retry_configuration_made(tiny_lm_dir, tmp_path):
    frozen_artifact, _ = _frozen_artifacts(tiny_lm_dir, tmp_path)
    in_memory = Prompter.from_base(tiny_lm_dir, similarity=None)
    in_memory.manifest.generation.max_new_tokens = 8
    for prompter, rewrites_per_prompt in ((frozen_artifact, 1), (in_memory, 2)):
        rewritten: list[str] = []
        original = prompter.rewrite_results

        def counting(prompts, *, _original=original, _log=rewritten, **kw):
            _log.extend(prompts)
            return _original(prompts, **kw)

        prompter.rewrite_results = counting  # type: ignore[method-assign]
        align_pro = WithPrompter(prompter=prompter)
        gated = WithRetryGate(retry=[align_pro], threshold=float("inf"))  # every prompt is retried
        report = Evaluator(PROMPTS, echo_target(), {"len": length_judge()}).run(
            [FrozenAlone(), align_pro, gated]
        )
        # A frozen artifact's greedy rewrites are made once; an in-memory prompter's weights may have changed.
        assert sorted(rewritten) == sorted(PROMPTS * rewrites_per_prompt)
        assert all(r["k"] == 2 for r in report.records if r["config"] == "gated-retry")


def test_twins_share_the_pairwise_judges_verdict_and_are_not_judged_again():
    judged: list[str] = []

    def judge(text: str) -> str:
        judged.append(text)
        return "A"

    def run(reference: str) -> dict:
        configs = [FrozenAlone(), FixedTemplate(), FixedTemplate(name="template-picked")]
        pairwise = PairwiseLLMJudge(CallableTarget(judge))
        ev = Evaluator(
            PROMPTS, echo_target(), {"len": length_judge()}, pairwise_judge=pairwise, reference=reference
        )
        return ev.run(configs).summary["configs"]

    entries = run("frozen")
    assert len(judged) == 2 * len(PROMPTS)  # both orders, for template only
    verdict = entries["template"]["pairwise_llm_judge_vs_reference"]
    assert entries["template-picked"]["pairwise_llm_judge_vs_reference"] == verdict
    # The twin of the reference has the reference's answers: a tie everywhere, without asking the judge.
    judged.clear()
    entries = run("template")
    assert len(judged) == 2 * len(PROMPTS)  # frozen is judged (both orders); template-picked is not
    assert entries["template-picked"]["pairwise_llm_judge_vs_reference"]["win_rate"] == 0.5


def test_a_subclass_with_the_same_key_is_not_merged():
    class Shouting(FixedTemplate):  # builds its inputs differently, keeps the parent's key
        def inputs(self, prompts):
            return [[TargetInput(f"{x.upper()}\n\n{self.template}", self.template)] for x in prompts]

    asked: list[str] = []
    report = Evaluator(PROMPTS, _counting_echo(asked), {"len": length_judge()}).run(
        [FrozenAlone(), FixedTemplate(), Shouting(name="shouting")]
    )
    assert len(asked) == 3 * len(PROMPTS)
    assert "same_inputs_as" not in report.summary["configs"]["shouting"]


def test_a_twin_resumed_from_an_older_run_gets_its_sources_records(tmp_path):
    # An older run answered "template-picked" on its own (another answer); now it is a twin of "template".
    older_answer = "a much longer answer"
    ev = Evaluator(PROMPTS, echo_target(), {"len": length_judge()}, out_dir=tmp_path)
    older = [
        FrozenAlone(),
        FixedTemplate(template="Be brief."),
        FixedTemplate(template="Be brief.", name="template-picked"),
    ]
    # Written as if by that older run: every prompt (so resuming finds the twin complete), the other answer.
    fp = ev._fingerprint(older[2])
    ev._append(
        [
            {
                "config": "template-picked",
                "idx": i,
                "prompt": x,
                "input": f"{x}\n\nBe brief.",
                "rewrite": "Be brief.",
                "fallback_reason": None,
                "answer": older_answer,
                "rewards": {"len": 20.0},
                "k": 1,
                "fingerprint": fp,
            }
            for i, x in enumerate(PROMPTS)
        ]
    )
    report = ev.run(older)
    rows = {c: [r for r in report.records if r["config"] == c] for c in ("template", "template-picked")}
    assert [r["answer"] for r in rows["template-picked"]] == [r["answer"] for r in rows["template"]]
    assert report.summary["configs"]["template-picked"]["same_inputs_as"] == "template"
    # The file agrees with the report: resuming reads the copies (the last line per cell wins).
    resumed = ev._load_done({c.name: ev._fingerprint(c) for c in older})
    assert [resumed[("template-picked", i)]["answer"] for i in range(len(PROMPTS))] == [
        r["answer"] for r in rows["template"]
    ]


def test_prompters_that_differ_in_settings_or_target_are_not_merged(tiny_lm_dir, tmp_path):
    sft, rl = _frozen_artifacts(tiny_lm_dir, tmp_path)
    rl.manifest.generation.max_new_tokens = 4  # changed after loading: other rewrites
    asked: list[str] = []
    other_asked: list[str] = []
    on_other_target = WithPrompter(prompter=sft, name="sft-elsewhere")
    on_other_target.target = _counting_echo(other_asked)  # the same rewrites, another model answers them
    report = Evaluator(PROMPTS, _counting_echo(asked), {"len": length_judge()}).run(
        [
            FrozenAlone(),
            WithPrompter(prompter=sft, name="sft"),
            WithPrompter(prompter=rl, name="align-pro"),
            on_other_target,
        ]
    )
    assert len(asked) == 3 * len(PROMPTS) and len(other_asked) == len(PROMPTS)
    assert not any("same_inputs_as" in e for e in report.summary["configs"].values())


def test_a_prompter_in_another_dtype_does_not_resume_the_records(tiny_lm_dir, tmp_path):
    import torch

    sft, _ = _frozen_artifacts(tiny_lm_dir, tmp_path)
    asked: list[str] = []

    def run(prompter: Prompter) -> None:
        Evaluator(PROMPTS, _counting_echo(asked), {"len": length_judge()}, out_dir=tmp_path / "eval").run(
            [FrozenAlone(), WithPrompter(prompter=prompter)]
        )

    run(sft)
    assert len(asked) == 2 * len(PROMPTS)
    run(Prompter.from_pretrained(tmp_path / "sft", device="cpu", similarity=None))  # the same: all resumed
    assert len(asked) == 2 * len(PROMPTS)
    as_float64 = Prompter.from_pretrained(
        tmp_path / "sft", device="cpu", similarity=None, dtype=torch.float64
    )
    assert sft.behaviour_id != as_float64.behaviour_id
    run(as_float64)  # other rewrites may follow: align-pro is answered again, frozen is resumed
    assert len(asked) == 3 * len(PROMPTS)


class _SamplingEcho(FrozenTarget):
    """Answers x plus a run of 'a's whose length is drawn from the global torch RNG; records what it was asked."""

    def __init__(self) -> None:
        super().__init__()
        self.temperature = 0.0
        self.asked: list[tuple[str, float]] = []

    @property
    def identity(self) -> str:
        return "sampling-echo"

    @property
    def settings(self) -> dict:
        return {"temperature": self.temperature}

    def _generate(self, prompts: list[str]) -> list[str]:
        import torch

        self.asked += [(p, self.temperature) for p in prompts]
        if self.temperature == 0:
            return list(prompts)
        return [f"{p} {'a' * int(torch.randint(1, 1000, ()))}" for p in prompts]


def test_best_of_n_asks_n_sampled_answers_to_x_and_keeps_the_selectors_best(tmp_path):
    import torch

    inner = _SamplingEcho()
    cached = CachedTarget(inner, tmp_path / "cache.jsonl")
    judges = {"reward": length_judge(), "independent": length_judge()}
    torch.manual_seed(3)
    state = torch.random.get_rng_state()
    report = Evaluator(PROMPTS, cached, judges, out_dir=tmp_path / "eval").run(
        [FrozenAlone(), BestOfN(n=3, temperature=0.9)]
    )
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    sampled = [(x, t) for x, t in inner.asked if t > 0]
    # Exactly n calls per prompt, each the bare prompt at the sampling temperature; frozen's stay greedy.
    assert sorted(sampled) == sorted((x, 0.9) for x in PROMPTS for _ in range(3))
    assert [x for x, t in inner.asked if t == 0] == PROMPTS
    assert inner.stats.calls == 4 * len(PROMPTS)
    assert len((tmp_path / "cache.jsonl").read_text().splitlines()) == 4 * len(PROMPTS)  # none collapsed
    for rec in report.records:
        if rec["config"] != "best-of-3":
            continue
        lengths = [c["rewards"]["reward"] for c in rec["candidates"]]
        assert rec["k"] == 3 and rec["input"] == rec["prompt"] and rec["rewrite"] is None
        assert len(set(lengths)) == 3  # three different samples were drawn
        assert rec["rewards"]["reward"] == max(lengths) and rec["kept"] == lengths.index(max(lengths))
    entry = report.summary["configs"]["best-of-3"]
    assert entry["target_calls_per_prompt"] == 3 and entry["k"] == 3
    # The same judge twice: the selector agrees with it on every pair and keeps its best everywhere.
    selection = entry["selection"]["independent"]
    assert selection["agreement"]["agreement"] == 1.0 and selection["agreement"]["pairs"] == 3 * len(PROMPTS)
    assert selection["kept_is_judge_best"] == 1.0
    # Draws are seeded: another store draws the same answers; best-of-2's draws are best-of-3's first two.
    again = _SamplingEcho()
    rerun = Evaluator(PROMPTS, CachedTarget(again), judges).run(
        [FrozenAlone(), BestOfN(n=3, temperature=0.9)]
    )
    answers = {r["prompt"]: r["answer"] for r in report.records if r["config"] == "best-of-3"}
    assert {r["prompt"]: r["answer"] for r in rerun.records if r["config"] == "best-of-3"} == answers
    calls = inner.stats.calls
    Evaluator(PROMPTS, cached, judges).run([FrozenAlone(), BestOfN(n=2, temperature=0.9)])
    assert inner.stats.calls == calls  # every draw came from the store
    Evaluator(PROMPTS, cached, judges).run([FrozenAlone(), BestOfN(n=2, temperature=0.5)])
    assert inner.stats.calls == calls + 2 * len(PROMPTS)  # another temperature: drawn afresh


def test_best_of_n_samples_a_local_model_once_per_draw(tiny_lm_dir, tmp_path):
    from alignpro_plugins.targets import TargetRequest, TransformersTarget

    inner = TransformersTarget(tiny_lm_dir, max_new_tokens=6, device="cpu")
    target = CachedTarget(inner, tmp_path / "cache.jsonl")
    cfg = BestOfN(n=4, temperature=1.0)
    report = Evaluator(PROMPTS[:2], target, {"len": length_judge()}, reference="best-of-4").run([cfg])
    assert inner.stats.calls == 4 * 2 and inner.temperature == 0.0  # the shared target stays greedy
    store = cfg.answering(target)
    for rec in report.records:
        draws = [store.cached(TargetRequest(rec["prompt"], context={"draw": d})) for d in range(4)]
        assert None not in draws and len(set(draws)) > 1  # the random tiny model sampled different answers
        assert rec["answer"] == draws[rec["kept"]]
    target.generate(PROMPTS[:2])
    assert inner.stats.calls == 10  # the greedy answers are other entries of the same store


def test_best_of_n_refuses_what_it_cannot_sample():
    from alignpro_plugins.evaluation import SampledTarget

    with pytest.raises(TypeError, match="has no temperature setting"):
        SampledTarget(echo_target(), 0.7)
    with pytest.raises(ValueError, match="temperature must be a number > 0"):
        BestOfN(n=2, temperature=0.0)
    with pytest.raises(ValueError, match="n >= 1"):
        BestOfN(n=0)
    with pytest.raises(ValueError, match="shared target"):
        WithRetryGate(retry=[BestOfN(n=2)])
    assert BestOfN(n=2).fingerprint() != BestOfN(n=2, seed=1).fingerprint()
    assert BestOfN(n=2).fingerprint() != BestOfN(n=2, temperature=1.0).fingerprint()


def test_configurations_with_more_calls_meet_best_of_n_with_as_many(tmp_path):
    judges = {
        "reward": length_judge(),
        "independent": CallableReward(lambda ps, ans: [-float(len(a)) for a in ans]),
    }
    configs = [
        FrozenAlone(),
        t := FixedTemplate(template="Be thorough."),
        WithRetryGate.rerank([t]),  # 2 calls everywhere
        WithRetryGate(retry=[t], threshold=12.5, name="gated"),  # 1.75 calls: meets best-of-2
        BestOfN(n=2, temperature=0.9),
    ]
    ev = Evaluator(PROMPTS, CachedTarget(_SamplingEcho()), judges, out_dir=tmp_path, focus="rerank")
    s = ev.run(configs).summary
    rows = {r["config"]: r for r in s["equal_calls"]}
    assert set(rows) == {"rerank", "gated"}
    assert rows["rerank"]["against"] == "best-of-2" and rows["gated"]["calls"] == pytest.approx(1.75)
    assert 0 <= rows["rerank"]["reward"]["length_controlled"]["win_rate"] <= 1
    # The independent judge prefers short answers: it disagrees with the length selector on every pair.
    sel = s["configs"]["rerank"]["selection"]
    assert sel["prompts_chosen_between"] == len(PROMPTS)
    assert (
        sel["independent"]["agreement"]["agreement"] == 0.0
        and sel["independent"]["kept_is_judge_best"] == 0.0
    )
    # Had it chosen, it would have kept x's answer: a tie with frozen on every prompt.
    assert sel["independent"]["judge_choice_vs_reference"]["win_rate"] == 0.5
    assert s["head_to_head"]["frozen"]["reward"]["length_controlled"]["n"] == len(PROMPTS)
    md = (tmp_path / "results.md").read_text()
    assert "| win rate (reward) | at equal length (reward) | mean difference (reward) |" in md
    assert "| rerank | 2.00 | best-of-2 | 2.00 |" in md
    assert "| rerank | 2.00 | 4 | 0% [0–0] (4) | 0% | 50.0% [50–50] |" in md
    assert "| template | 1 of 4 | 100% | Be thorough. |" in md


def test_distinct_outputs_and_the_most_common_outputs_share():
    from alignpro_plugins.evaluation import prompter_outputs

    rows = [
        {"rewrite": "Be thorough.", "fallback_reason": None},
        {"rewrite": "Be thorough.", "fallback_reason": None},
        {"rewrite": "Give examples.", "fallback_reason": None},
        {"rewrite": "", "fallback_reason": "no_change"},  # x passed through: one output, whatever the reason
        {"rewrite": "garbled", "fallback_reason": "drift"},
    ]
    out = prompter_outputs(rows)
    assert out == {"distinct": 3, "top": "Be thorough.", "top_share": 0.4, "n": 5}
    assert stats.most_common_share(["a"] * 99 + ["b"]) == {
        "distinct": 2,
        "top": "a",
        "top_share": 0.99,
        "n": 100,
    }
    assert math.isnan(stats.most_common_share([])["top_share"])


def test_pairwise_agreement_counts_the_pairs_both_judges_tell_apart():
    # Prompt 1: three answers, selector order a>b>c, judge a>c>b: pairs (a,b), (a,c) agree, (b,c) does not.
    # Prompt 2: the judge ties the two answers: no pair counts. Prompt 3: they disagree on the one pair.
    groups = [[(3.0, 3.0), (2.0, 1.0), (1.0, 2.0)], [(1.0, 5.0), (0.0, 5.0)], [(1.0, 0.0), (0.0, 1.0)]]
    a = stats.pairwise_agreement(groups)
    assert a["agreement"] == pytest.approx(2 / 4) and a["pairs"] == 4 and a["prompts"] == 2
    assert a["ci_low"] <= 0.5 <= a["ci_high"] and 0 <= a["ci_low"] and a["ci_high"] <= 2 / 3
    none = stats.pairwise_agreement([[(1.0, 1.0)], [(1.0, 2.0), (1.0, 3.0)]])
    assert none["pairs"] == 0 and math.isnan(none["agreement"])
