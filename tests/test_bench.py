"""bench/gpu.py (the device throughput/MFU script) runs end to end on a tiny shape and counts FLOPs by hand;
bench/memory.py measures what checkpointing saves; bench/splits.py scores as the evaluation does."""
import math

import pytest

from bench import gpu as bench_gpu
from bench import memory as bench_memory


def test_tiny_shape_runs_the_whole_script_on_cpu():
    result = bench_gpu.run(bench_gpu.parse_args(["--shape=tiny", "--prompts=2", "--generations=3",
                                                 "--prompt_tokens=16", "--new_tokens=5", "--runs=1",
                                                 "--peak_tflops=1"]))
    assert result["rollout_s"] > 0 and result["train_s"] > 0
    assert result["rollout_generated_tokens_per_s"] * result["rollout_s"] == pytest.approx(2 * 3 * 5)
    assert result["train_tokens_per_s"] * result["train_s"] == pytest.approx(2 * (16 + 3 * 5))
    assert result["train_mfu"] == result["train_tflops"] and result["decoder_matmul_params"] == 73728
    # the tree-masked forward equals the naive one on the bench's batch (the GPU run reports the same gap)
    assert result["max_abs_logp_gap_shared_vs_full_fp32"] < 1e-5
    assert result["max_abs_logp_gap_shared_vs_full_bf16"] < 0.05


def test_flops_by_hand():
    import torch

    model = bench_gpu.build_model("tiny", torch.device("cpu"), checkpointing=False)
    per_layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128  # q, k, v, o (2 of 4 heads for k/v), MLP
    assert bench_gpu.matmul_params(model) == 2 * per_layer
    # prompt of 3, 2 completions of 2: 3 + 4 tokens; keys attended 1+2+3 (prompt) + 2·(4+5) (completions)
    want = 2 * 2 * per_layer * 7 + 4 * 2 * 64 * (6 + 18) + 2 * 64 * 512 * 4
    assert bench_gpu.forward_flops(model, 3, 2, 2, logits=4) == want


def test_memory_bench_sees_checkpointing_keep_less_per_layer():
    result = bench_memory.run(bench_memory.parse_args(["--shape=tiny", "--prompt_tokens=64", "--completion_tokens=8"]))
    plain, checkpointed = result["no_checkpointing"], result["checkpointing"]
    assert plain["per_layer_mb"] > 0 and 0 < checkpointed["per_layer_mb"] < plain["per_layer_mb"] / 2
    assert result["params"] == sum(p.numel() for p in bench_memory.build_model("tiny", 2, False).parameters())


def test_roofline_bench_runs_on_a_tiny_model(tiny_model_dir):
    from bench import roofline

    result = roofline.run(roofline.parse_args([f"--model={tiny_model_dir}", "--rows=2", "--bc_steps=1", "--runs=1"]))
    assert set(result["limits_gflops"]) == {"fp32", "bf16"} and all(v > 0 for v in result["limits_gflops"].values())
    assert list(result["phases"]) == ["exact evaluation, fp32", "exact evaluation, bf16",
                                      "exact evaluation, fp32, the click alone", "cloning step, fp32",
                                      "cloning step, bf16", "cloning step, fp32, the click alone"]
    phases = result["phases"]  # the opinion's branches are model FLOPs too
    assert phases["exact evaluation, fp32"][1] > phases["exact evaluation, fp32, the click alone"][1]
    assert phases["cloning step, fp32"][1] > phases["cloning step, fp32, the click alone"][1]
    assert all(rate > 0 and gflop > 0 for rate, gflop in result["phases"].values())
    precision = result["precision"]
    assert list(precision) == ["fp32", "bf16", "bf16, bf16 head"] and result["rows"] == 2
    assert precision["fp32"]["max_abs_prob_diff"] == 0  # against itself
    assert all(0 <= p["max_abs_prob_diff"] < 1 and all(x > 0 for x in p["logloss"]) for p in precision.values())
    text = roofline.table(result)
    assert "| exact evaluation, fp32 |" in text and "of the bf16 limit" in text and result["machine"] in text
    assert "| bf16, bf16 head |" in text
    import train_grail as tg

    recipe = tg.parse_config([f"--config={roofline.CPU_RECIPE}"], {})[0]
    job, cloned = result["job"], recipe.bc_steps * recipe.prompts_per_step  # 2 evaluations, 70 steps of 2 rows
    assert (job["evaluations"], job["cloned_rows"]) == (2, cloned) and job["eval_rows"] > 0
    assert job["tflop"] == pytest.approx((2 * job["eval_rows"] * phases["exact evaluation, bf16"][1]
                                          + cloned * phases["cloning step, bf16"][1]) / 1e3)
    assert f"{job['tflop']:.1f} TFLOP" in text
    for name, split in result["time_split"].items():  # the shares of the ops' time add up; matmuls did work
        assert split["matmul"] + split["attention"] + split["other"] == pytest.approx(1)
        assert split["matmul"] > 0 and split["matmul_gflops"] > 0 and f"| {name} | {split['matmul']:.2f} |" in text


def test_eval_drift_bench_runs_on_a_tiny_model(tiny_model_dir):
    from bench import eval_drift

    result = eval_drift.run({"model": str(tiny_model_dir), "threads": 0, "rows": 2, "bc_steps": 1, "runs": 1})
    assert all(result[k] > 0 for k in ("before", "after", "cloning_rows_per_s"))
    text = eval_drift.table(result)
    assert f"| after / before | {result['after'] / result['before']:.2f} |" in text and result["machine"] in text


def test_splits_bench_scores_each_split_as_the_evaluation_does():
    """bench.splits' per-issue baselines on a participant split, against each baseline's function
    applied row by row here (the bench reads them from opinions.opinion_metrics)."""
    import choices
    import data
    import opinions
    from bench import splits

    scores = splits.split_scores("", 0.1, 42)
    train_rows, val_rows = data.load_examples("", 0.1, 42, log=lambda msg: None)
    prior = choices.position_prior(train_rows)
    baselines = {"direction_prior": opinions.direction_prior(train_rows),
                 "index_logistic": opinions.index_baseline(train_rows),
                 "viewpoint_table": opinions.viewpoint_baseline(train_rows)}
    assert sorted(scores) == ["gun_control", "minimum_wage"]
    for issue, split in scores.items():
        rows = [r for r in val_rows if r["issue"] == issue]
        assert split["rows"] == len(rows) and split["opinion_rows"] == sum(bool(r.get("opinion_direction")) for r in rows)
        want = sum(-math.log(prior(r["n_options"])[r["gold_index"] - 1]) for r in rows) / len(rows)
        assert split["prior"] == pytest.approx(want)
        labelled = [r for r in rows if r.get("opinion_direction")]
        for key, predict in baselines.items():
            want = sum(-math.log(predict(r)[opinions.label_index(r) - 1]) for r in labelled) / len(labelled)
            assert split[key] == pytest.approx(want), key
        assert split["opinion_uniform"] == pytest.approx(math.log(3))
    assert splits.seeds_of("3") == [0, 1, 2] and splits.seeds_of("42,7") == [42, 7]


def test_reading_bench_clones_the_opinion_alone_and_scores_it_by_viewpoint(tiny_model_dir):
    from bench import reading

    result = reading.run(reading.parse_args([f"--model={tiny_model_dir}", "--steps=10", "--lr=1e-2", "--seed=42"]))
    assert result["loss"][1] < result["loss"][0]  # the opinion's cross-entropy fell
    assert list(result["scores"]) == ["untrained", "cloned", "direction prior", "viewpoint table"]
    assert all(s["participants"] == result["participants"] for s in result["scores"].values())
    assert result["scores"]["cloned"]["logloss"] != result["scores"]["untrained"]["logloss"]
    assert sum(n for n, _, _ in result["viewpoints"].values()) == result["participants"]
    for _, humans, mean in result["viewpoints"].values():
        assert sum(humans.values()) == pytest.approx(1) and sum(mean.values()) == pytest.approx(1)
    assert "| initial viewpoint |" in reading.table(result)
