"""Evaluation on hand-made fixtures: intervals, baselines, views, published checkpoints; the cache of
an unchanged model's exact distributions."""
import json
import random
import shutil
from collections import Counter

import pytest

import checkpoint
import choices
import data
import distributed
import evaluate
import prompts
import reports


def row(gold, n, missing_duration=(), study="study1", refs=None):
    slate = [{"id": f"v{k}", "title": f"T{k}", "channel_title": "C", "length_seconds":
              None if k in missing_duration else 100 + k, "view_count": 5} for k in range(1, n + 1)]
    return {"slate_items_json": slate, "gold_index": gold, "n_options": n, "participant_study": study,
            "issue": "gun_control", "reference_predictions": refs or {}}


@pytest.mark.parametrize("k, n, lo, hi", [(8, 10, 0.4902, 0.9433), (0, 10, 0.0, 0.2775), (50, 100, 0.4038, 0.5962)])
def test_wilson_interval_known_values(k, n, lo, hi):
    got = evaluate.wilson_interval(k, n)
    assert got[0] == pytest.approx(lo, abs=1e-4) and got[1] == pytest.approx(hi, abs=1e-4)


def test_every_baseline_on_a_fixture():
    rows = [row(1, 4), row(4, 4, missing_duration=[4]), row(2, 2, missing_duration=[2]), row(2, 3, missing_duration=[1, 2])]
    train = [row(2, 4)] * 3 + [row(1, 4)]
    preds = evaluate.baseline_predictions(rows, train, with_cue=True)
    assert preds["always_first"] == [1, 1, 1, 1]
    assert preds["always_last"] == [4, 4, 2, 3]
    assert preds["most_frequent_index_train_2"] == [2, 2, 2, 2]  # fit on the training rows
    assert preds["cue_no_duration"] == [1, 4, 2, 1]
    metrics = evaluate.view_metrics(rows, [1, 4, None, 2], train, "original", [True, True, False, True])
    b = metrics["baselines"]
    assert metrics["accuracy"] == 0.75 and metrics["parsed_rate"] == 0.75
    assert b["random"]["accuracy"] == pytest.approx((1 / 4 + 1 / 4 + 1 / 2 + 1 / 3) / 4)
    assert b["always_first"]["accuracy"] == 0.25 and b["always_last"]["accuracy"] == 0.5
    assert b["most_frequent_index_train_2"]["accuracy"] == 0.5 and b["cue_no_duration"]["accuracy"] == 0.75
    assert "cue_no_duration" not in evaluate.view_metrics(rows, [1] * 4, train, "cue_neutral")["baselines"]


def test_shuffled_view_remaps_gold_and_is_deterministic():
    rows = [row(g, 5) for g in (1, 2, 3, 4, 5)] * 4
    a, b = evaluate.view_rows(rows, "shuffled", seed=1), evaluate.view_rows(rows, "shuffled", seed=1)
    assert a == b
    for original, shown in zip(rows, a):
        assert shown["slate_items_json"][shown["gold_index"] - 1]["id"] == f"v{original['gold_index']}"
    assert [r["gold_index"] for r in a] != [r["gold_index"] for r in rows]
    assert evaluate.view_rows(rows, "shuffled", seed=2) != a


def test_cue_neutral_view_shows_titles_only():
    shown = evaluate.view_rows([row(2, 3, missing_duration=[2])], "cue_neutral", seed=0)[0]
    text = prompts.render_user_prompt({**shown, "watched_detailed_json": []})
    options = text.split("OPTIONS\n")[1].split("\n\n")[0]
    assert options == "1. T1\n2. T2\n3. T3"
    assert shown["gold_index"] == 2


def test_reference_checkpoints_on_the_same_rows():
    rows = [row(1, 4, refs={"grail": 1, "grpo": None}), row(2, 4, refs={"grail": 4, "grpo": 2}), row(3, 4)]
    refs = evaluate.reference_metrics(rows)
    assert refs["grail"]["accuracy"] == 0.5 and refs["grail"]["n"] == 2
    assert refs["grpo"]["accuracy"] == 1.0 and refs["grpo"]["n"] == 1


def test_distribution_cache_reuses_only_what_the_same_files_code_and_prompt_give(tiny_model_dir, tmp_path,
                                                                                  monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    world = distributed.single_process("cpu")
    model, tokenizer = checkpoint.load_model(str(folder), world.device, trainable=False), checkpoint.load_tokenizer(str(folder))
    rows = data.load_examples("", 0.1, 0, log=lambda msg: None)[1][:3]
    calls = []
    real = choices.answer_logprobs
    monkeypatch.setattr(choices, "answer_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run(prompt=prompts.PromptFormat("answer"), cache_dir=tmp_path / "evals"):
        cache = evaluate.DistributionCache(folder, model, "fp32", cache_dir, distributed.single_process())
        return evaluate.exact_distributions(model, tokenizer, rows, prompt, world, 2, evaluate.never, cache=cache)

    first = run()
    assert len(calls) == 3
    assert run() == first and len(calls) == 3  # read back, nothing computed
    run(prompts.PromptFormat("answer", system_prompt="Be brief."))  # another prompt: other keys
    assert len(calls) == 6
    (folder / "config.json").write_text((folder / "config.json").read_text() + " ")  # other files: another cache
    assert run() == first and len(calls) == 9
    cache_file = evaluate.DistributionCache(folder, model, "fp32", tmp_path / "evals", distributed.single_process()).path
    other_precision = evaluate.DistributionCache(folder, model, "bf16", tmp_path / "evals", distributed.single_process())
    assert other_precision.path != cache_file  # a precision's distributions are not another's
    cache_file.write_text("{broken")  # never trusted: recomputed, and the file repaired
    assert run() == first and len(calls) == 12
    assert json.loads(cache_file.read_text())


def test_the_cache_key_covers_every_project_file_an_exact_distribution_runs(tiny_model_dir, tmp_path):
    """A stale cache would silently score old code: every project module whose code runs while a
    distribution is computed (traced) is in the key."""
    import sys
    from pathlib import Path

    root = Path(evaluate.__file__).parent
    world = distributed.single_process("cpu")
    model, tokenizer = checkpoint.load_model(str(tiny_model_dir), world.device, trainable=False), \
        checkpoint.load_tokenizer(str(tiny_model_dir))
    rows = data.load_examples("", 0.1, 0, log=lambda msg: None)[1][:2]
    ran = set()

    def trace(frame, event, arg):
        path = Path(frame.f_code.co_filename)
        if event == "call" and path.parent == root:
            ran.add(path.name)

    sys.setprofile(trace)
    try:
        with distributed.autocast(world.device, False, True):
            evaluate.exact_distributions(model, tokenizer, rows, prompts.PromptFormat("answer"), world, 2,
                                         evaluate.never)
    finally:
        sys.setprofile(None)
    assert {"choices.py", "grpo.py", "evaluate.py"} <= ran  # the trace sees the project's code
    assert ran <= set(evaluate.DistributionCache.CACHE_SOURCES)


def test_a_row_sample_keeps_every_issue_and_study_in_its_share():
    """eval_max_rows samples within each (issue, study): a small third issue is not left out."""
    rows = ([{"issue": "a", "participant_study": "s1", "k": i} for i in range(40)] +
            [{"issue": "b", "participant_study": "s2", "k": i} for i in range(6)] +
            [{"issue": "c", "participant_study": "s3", "k": i} for i in range(3)])
    for seed in range(20):
        picked = evaluate.select_rows([], rows, "validation", 8, seed)
        counts = Counter(row["issue"] for row in picked)
        assert len(picked) == 8 and counts["b"] >= 1 and counts["c"] >= 1 and counts["a"] >= 5, counts
        assert picked == [row for row in rows if row in picked]  # in their order
    assert evaluate.select_rows([], rows, "validation", 8, 3) == evaluate.select_rows([], rows, "validation", 8, 3)


def test_stratified_sample_takes_k_in_proportion_one_of_each_first():
    rng = random.Random(0)
    for _ in range(300):
        groups, start = [], 0
        for size in [rng.randint(1, 30) for _ in range(rng.randint(1, 6))]:
            groups.append(list(range(start, start + size)))
            start += size
        k = rng.randint(1, start)
        picked = evaluate.stratified_sample(groups, k, random.Random(1))
        assert len(picked) == len(set(picked)) == k and picked == sorted(picked)
        taken = [len(set(group) & set(picked)) for group in groups]
        if k >= len(groups):
            assert min(taken) >= 1
            left = k - len(groups)
            for group, n in zip(groups, taken if left else []):  # beyond the first, within one of the proportional share
                assert abs((n - 1) - left * (len(group) - 1) / (start - len(groups))) < 1 + 1e-9


def test_sampled_valid_mass_is_the_share_of_samples_that_parse(monkeypatch):
    """Think mode: 3 samples a row on a 12-option slate. The smoothed estimate keeps 0.63 of its mass
    on options when no sample parses; the valid mass reported is what the samples did."""
    import train_grail as tg

    rows = [dict(row(11, 12), opinion_direction="increase", participant_key=f"p{k}") for k in (1, 2)]
    rows[1]["gold_index"] = 2
    texts = {True: ["<think>x</think><answer>11</answer>"],
             False: ["<answer>11</answer><opinion>increase</opinion>", "no answer", "<answer>99</answer>"]}

    def complete(model, tokenizer, rows_, prompt, cfg, world, k, greedy, should_stop, what):
        return [(texts[greedy] if i == 0 else ["junk"] * k, [False] * k) for i in range(len(rows_))]

    monkeypatch.setattr(evaluate, "complete_rows", complete)
    cfg = tg.Config(prompt_mode="think", eval_samples=3)
    out, _ = evaluate.sampled_view(None, None, rows, rows, prompts.PromptFormat("think"), cfg,
                                   distributed.single_process(), "original", lambda: False)
    assert out["choice"]["model"]["valid_mass"] == pytest.approx((1 / 3 + 0) / 2)
    assert [g["model"]["valid_mass"] for g in out["choice"]["by_group"].values()] == [pytest.approx(1 / 6)]
    assert sum(choices.sampled_distribution([None] * 3, 12)) == pytest.approx(0.63, abs=0.01)
    assert out["opinion"]["model"]["valid_mass"] == pytest.approx((1 / 3 + 0) / 2)  # the opinion's alike
    assert [g["model"]["valid_mass"] for g in out["opinion"]["by_issue"].values()] == [pytest.approx(1 / 6)]
    # the greedy answer's opinion accuracy (none of the greedy texts holds an opinion) is in the report
    assert out["opinion_accuracy"]["accuracy"] == 0.0
    assert "| opinion of that answer | 0.0% [" in reports.accuracy_summary({"views": {"original": out}})
