"""End-to-end runs of train_grail.py on a tiny random model: training, GAIL, resume, evaluation,
torchrun, recipes, and the documentation of every Config key."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distributed
import grpo
import reports
import train_grail as tg
from outputs import RunFolder, append_jsonl

ROOT = Path(__file__).resolve().parent.parent
CPU = distributed.single_process()


def small_cfg(model_dir, out_dir, **overrides):
    values = dict(model_name_or_path=str(model_dir), output_dir=str(out_dir), prompt_mode="answer", max_steps=2,
                  prompts_per_step=2, num_generations=3, max_completion_length=6, eval_max_rows=6,
                  eval_batch_size=6, save_steps=2, learning_rate=1e-3, log_completions_steps=1, eval_on_start=True,
                  eval_on_end=True)
    values.update(overrides)
    return tg.Config(**values)


# --- end to end ------------------------------------------------------------------------------

def test_gail_run_logs_disc_metrics(tiny_model_dir, tmp_path):
    # Cloned first, so some of the tiny model's answers parse and D scores them.
    tg.train(small_cfg(tiny_model_dir, tmp_path, max_steps=3, gail_use=True, gail_warmup_steps=1,
                       gail_disc_batch=8, eval_samples=0, gail_disc_steps=2, bc_steps=60, bc_learning_rate=1e-2,
                       max_completion_length=12), CPU)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in ("disc/loss", "disc/acc_human", "disc/acc_policy", "disc/mean_d_policy", "disc/entropy",
                "disc/heldout_acc_human", "disc/pos1/human_share", "disc/pos1/policy_share", "disc/pos1/mean_d",
                "reward/disc/mean", "reward/disc/std"):
        assert key in lines[-1], key
    assert len({m["disc/loss"] for m in lines}) == 3  # it trains
    for m in lines:  # the warm-up trained D before step 1: its reward is in every step's total
        base = m["reward/accuracy/mean"] + 0.2 * m["reward/format/mean"]
        assert m["reward/total/mean"] == pytest.approx((base + 0.5 * m["reward/disc/mean"]) / 1.5)
    shares = [value for key, value in lines[-1].items() if key.endswith("/human_share")]
    assert shares and sum(shares) == pytest.approx(1.0)
    text = reports.write_report([tmp_path], out=tmp_path / "report").read_text()
    section = text.split("## Discriminator: ")[1].split("\n## ")[0]
    scored = [m for m in lines if m.get("disc/heldout_acc") is not None]  # steps with a valid policy choice
    assert scored and f"| {scored[-1]['step']} | {reports.num(scored[-1]['disc/heldout_acc'])} |" in section
    assert "| position | human share | policy share | mean D |" in section and "| 1 | " in section
    assert (tmp_path / "checkpoint-000002" / "disc.pt").exists()


def test_gail_warm_up_samples_skip_the_updates_log_prob_passes(tiny_model_dir, tmp_path, monkeypatch):
    """Only D reads the warm-up's samples: the old-policy and reference passes run for the GRPO step alone."""
    calls = []
    real = grpo.no_grad_logprobs
    monkeypatch.setattr(grpo, "no_grad_logprobs", lambda *args: calls.append(1) or real(*args))
    tg.train(small_cfg(tiny_model_dir, tmp_path, max_steps=1, save_steps=0, gail_use=True, gail_warmup_steps=2,
                       gail_disc_batch=4, num_iterations=2, beta=0.1, eval_on_start=False, eval_on_end=False), CPU)
    assert len(calls) == 2  # one step: the sampling policy's and the reference's


def test_behaviour_cloning_raises_the_likelihood_of_the_human_answers(tiny_model_dir, tmp_path, capsys):
    cfg = small_cfg(tiny_model_dir, tmp_path, max_steps=1, bc_steps=30, bc_learning_rate=1e-2, eval_split="train",
                    eval_max_rows=4, eval_views=["original"], reward_funcs=["calibration", "format"],
                    scale_rewards="batch")
    tg.train(cfg, CPU)
    out, progress = capsys.readouterr()  # the long phases show progress (tqdm)
    assert "[config] scale_rewards=batch at 2 prompts a step tilts the calibration reward toward the mode" in out
    assert "cloning: 100%" in progress and "30/30" in progress
    assert "eval original, exact: 100%" in progress and "4/4" in progress
    before = json.loads((tmp_path / "evals" / "step_000000.json").read_text())
    after = json.loads((tmp_path / "eval.json").read_text())
    assert after["choice_valid_mass"] > 2 * before["choice_valid_mass"]  # it learned "N</answer>"
    assert after["choice_logloss"] < before["choice_logloss"] - 1
    opinion_mass = [ev["views"]["original"]["opinion"]["model"]["valid_mass"] for ev in (before, after)]
    assert opinion_mass[1] > 2 * opinion_mass[0]  # and "</answer><opinion>d</opinion>" after the click
    assert after["opinion_logloss"] < before["opinion_logloss"] - 1
    curve = RunFolder(tmp_path).cloning.read_text().splitlines()  # the warm start's curve, one line a step
    curve = [json.loads(line) for line in curve]
    assert [c["bc_step"] for c in curve] == list(range(1, 31)) and curve[0]["lr"] == 1e-2
    assert all(math.isfinite(c["grad_norm"]) for c in curve) and curve[-1]["loss"] < curve[0]["loss"]


def run_cli(args, nproc=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_TOKEN="hf_SECRET_token_for_the_test")
    env.pop("GAIL_USE", None)
    launcher = [sys.executable] if nproc is None else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(launcher + ["train_grail.py"] + args, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def first_error(stderr):
    """A failed torchrun's stderr from the first rank's error on (its summary alone names no cause)."""
    starts = [i for i in (stderr.find("Traceback"), stderr.find("terminate called"), stderr.find("Error")) if i >= 0]
    return stderr[min(starts, default=0):][:6000]


def tiny_args(model_dir, out_dir):
    return [f"--model_name_or_path={model_dir}", f"--output_dir={out_dir}", "--prompt_mode=answer",
            "--max_steps=2", "--prompts_per_step=2", "--num_generations=3", "--max_completion_length=6",
            "--eval_max_rows=6", "--save_steps=2", "--learning_rate=1e-3", "--eval_on_start=true", "--eval_on_end=true"]


def test_two_step_run_writes_metrics_eval_and_a_loadable_checkpoint(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    result = run_cli(tiny_args(tiny_model_dir, tmp_path) + ["--beta=0.04", "--num_iterations=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for key in ("reward/total/mean", "reward/accuracy/std", "reward/format/mean", "frac_reward_zero_std", "kl",
                "clip_ratio", "completion_length/mean", "lr", "grad_norm", "step_seconds", "tokens_per_second"):
        assert key in lines[0], key
    ev = json.loads((tmp_path / "eval.json").read_text())
    for key in ("accuracy_overall", "parsed_rate", "format_rate", "by_n_options", "group_metrics",
                "gold_index_distribution", "baseline_most_frequent_gold_index", "random_baseline_expected_accuracy",
                "views", "reference_checkpoints", "choice_logloss", "choice_logloss_renorm", "choice_brier",
                "choice_tvd", "choice_valid_mass", "prior_logloss", "uniform_logloss"):
        assert key in ev, key
    assert ev["choice_method"] == "exact" and 0 < ev["choice_valid_mass"] <= 1
    assert ev["untrained"]["step"] == 0  # step 0's scores stand beside the final ones
    assert set(ev["views"]) == {"original", "shuffled", "cue_neutral"}
    original = ev["views"]["original"]
    assert {"always_first", "always_last", "random", "cue_no_duration"} <= set(original["baselines"])
    assert ev["accuracy_overall"] == original["accuracy"] and ev["n_total"] == 6 and ev["step"] == 2
    assert (tmp_path / "evals" / "step_000000.json").exists()
    assert (tmp_path / "completions.jsonl").read_text().strip()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["config"]["beta"] == 0.04 and config["environment"]["world_size"] == 1
    assert config["environment"]["torch"] == torch.__version__
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-000002")
    assert model.config.vocab_size > 0
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl", ".txt", ".md")]
    assert written and not any("hf_SECRET" in p.read_text(errors="ignore") for p in written)
    assert "hf_SECRET" not in result.stdout + result.stderr
    assert "[eval step 0, " in result.stdout and "always_last" in result.stdout
    # Said before the evaluation starts: what it will score.
    assert "[eval step 0] 6 validation rows x 3 views (original, shuffled, cue_neutral), exact" in result.stdout


@pytest.mark.parametrize("gail", [False, True])
def test_resume_continues_exactly_like_an_uninterrupted_run(tiny_model_dir, tmp_path, gail):
    extra = dict(gail_use=gail, gail_warmup_steps=1, gail_disc_batch=8, eval_samples=0)
    straight = tmp_path / "straight"
    tg.train(small_cfg(tiny_model_dir, straight, max_steps=4, save_steps=2, **extra), CPU)
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    import shutil

    shutil.copytree(straight / "checkpoint-000002", resumed / "checkpoint-000002")
    tg.train(small_cfg(tiny_model_dir, resumed, max_steps=4, save_steps=2, **extra), CPU)
    if gail:
        disc_a = torch.load(straight / "checkpoint-000004" / "disc.pt", weights_only=True)
        disc_b = torch.load(resumed / "checkpoint-000004" / "disc.pt", weights_only=True)
        assert all(torch.equal(disc_a["disc"][k], disc_b["disc"][k]) for k in disc_a["disc"])
        assert (straight / "checkpoint-000004" / "disc_rank0.json").read_text() == \
            (resumed / "checkpoint-000004" / "disc_rank0.json").read_text()  # replay buffer and its RNG
    a = load_file(straight / "checkpoint-000004" / "model.safetensors")
    b = load_file(resumed / "checkpoint-000004" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    opt_a = torch.load(straight / "checkpoint-000004" / "optimizer.pt", weights_only=True)
    opt_b = torch.load(resumed / "checkpoint-000004" / "optimizer.pt", weights_only=True)
    for key, state in opt_a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg"], opt_b["optimizer"]["state"][key]["exp_avg"])
    steps_a = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()][2:]
    steps_b = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [m["reward/total/mean"] for m in steps_a] == [m["reward/total/mean"] for m in steps_b]
    assert [m["loss"] for m in steps_a] == [m["loss"] for m in steps_b]
    if gail:
        assert [m["disc/loss"] for m in steps_a] == [m["disc/loss"] for m in steps_b]


def test_a_raised_max_steps_resumes_on_the_new_schedule(tiny_model_dir, tmp_path):
    """A finished 2-step run resumed to 4 steps: steps 3 and 4 take the rates of a 4-step schedule
    (the restored optimizer held the old one's, 0 at its end)."""
    extra = dict(warmup_ratio=0.0, eval_on_start=False, eval_on_end=False)
    tg.train(small_cfg(tiny_model_dir, tmp_path / "four", max_steps=4, save_steps=2, **extra), CPU)
    tg.train(small_cfg(tiny_model_dir, tmp_path / "raised", max_steps=2, save_steps=2, **extra), CPU)
    tg.train(small_cfg(tiny_model_dir, tmp_path / "raised", max_steps=4, save_steps=2, **extra), CPU)
    rates = {name: [json.loads(line)["lr"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
             for name in ("four", "raised")}
    assert rates["raised"][2:] == rates["four"][2:] and rates["four"][2] > 0


def test_eval_only_on_a_checkpoint_folder(tiny_model_dir, tmp_path):
    tg.train(small_cfg(tiny_model_dir, tmp_path / "run", max_steps=2, save_steps=1, save_total_limit=2), CPU)
    out = tmp_path / "eval"
    tg.train(small_cfg(tiny_model_dir, out, eval_only=str(tmp_path / "run" / "checkpoint-000002")), CPU)
    metrics = tg.train(small_cfg(tiny_model_dir, out, eval_only=str(tmp_path / "run" / "checkpoint-000001")), CPU)
    # one evaluation a folder: the other checkpoint's is not kept as this one's "before"
    assert [p.name for p in (out / "evals").iterdir()] == ["step_000001.json"]
    saved = json.loads((out / "eval.json").read_text())
    assert saved["accuracy_overall"] == metrics["accuracy_overall"]
    assert saved["model"] == str(tmp_path / "run" / "checkpoint-000001")
    assert saved["split"] == "validation" and saved["step"] == 1  # the checkpoint's step, not the untrained's 0
    assert saved["baselines_in_sample_rows"] == 0  # held-out participants: the baselines never saw them
    assert not (out / "metrics.jsonl").exists()


def test_eval_only_command_writes_the_choice_keys(tiny_model_dir, tmp_path, bundled):
    """The documented command: any checkpoint, any rows, every split; scored in the checkpoint's own
    (answer) prompt mode, so exactly."""
    tg.train(small_cfg(tiny_model_dir, tmp_path / "run", max_steps=1, save_steps=1), CPU)
    rows = tmp_path / "rows.jsonl"
    append_jsonl(rows, bundled[:5])
    result = run_cli([f"--eval_only={tmp_path / 'run' / 'checkpoint-000001'}", f"--dataset={rows}", "--eval_split=all",
                      f"--output_dir={tmp_path / 'eval'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["n_total"] == 5 and saved["choice_method"] == "exact"
    for key in ("choice_logloss", "choice_logloss_renorm", "choice_brier", "choice_tvd", "choice_valid_mass",
                "prior_logloss", "uniform_logloss", "opinion_logloss", "opinion_brier", "opinion_prior_logloss",
                "opinion_baseline_logloss", "opinion_uniform_logloss"):
        assert isinstance(saved[key], float), key
    assert saved["opinion_method"] == "exact" and saved["opinion_uniform_logloss"] == pytest.approx(math.log(3))
    import data  # every row's participant in the split the baselines are fit on counts as in-sample
    train_rows, val_rows = data.load_examples(str(rows), 0.1, 42, log=lambda *_: None)
    assert saved["baselines_in_sample_rows"] == len(train_rows) and len(val_rows) < 5
    assert f"of {len(train_rows)} of these 5 rows: on those rows they are in-sample" in result.stdout


def test_eval_only_on_rows_that_ship_only_a_test_split(tiny_model_dir, tmp_path, bundled):
    """A held-out file alone (nothing to train on) is enough to score a model: the baselines that are
    fit on training rows fall back to uniform, and a file without opinion labels still writes the
    opinion's keys, as nulls."""
    folder = tmp_path / "rows"
    folder.mkdir()
    append_jsonl(folder / "test.jsonl", [dict(r, opinion_direction=None) for r in bundled[:4]])
    tg.train(small_cfg(tiny_model_dir, tmp_path / "eval", eval_only=str(tiny_model_dir), dataset=str(folder),
                       eval_cache=False), CPU)
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["n_total"] == 4 and saved["split"] == "validation"
    assert saved["prior_logloss"] == pytest.approx(saved["uniform_logloss"])
    assert saved["opinion_logloss"] is None and saved["opinion_prior_logloss"] is None


def test_rows_longer_than_the_models_positions_are_skipped_in_training_and_evaluation(tiny_model_dir, tmp_path,
                                                                                      capsys):
    """A model with fewer positions than some prompts need: those rows leave training and the evaluation,
    each side counted on a log line, and the evaluation scores exactly the rest."""
    import data
    import prompts
    from transformers import AutoTokenizer

    short = tmp_path / "short_model"
    shutil.copytree(tiny_model_dir, short)
    config = json.loads((short / "config.json").read_text())
    cfg = small_cfg(short, tmp_path / "run", max_steps=1, save_steps=1, eval_on_start=False, eval_max_rows=12)
    tokenizer, prompt = AutoTokenizer.from_pretrained(short), prompts.PromptFormat.of(cfg)
    train_rows, val_rows = data.load_examples("", cfg.val_fraction, cfg.seed, log=lambda *_: None)
    eval_rows = tg.evaluate.select_rows(train_rows, val_rows, "validation", 12, cfg.seed)
    length = lambda r: len(tokenizer.encode(prompt.text(tokenizer, r), add_special_tokens=False))
    config["max_position_embeddings"] = sorted(map(length, eval_rows))[6] + cfg.max_completion_length
    (short / "config.json").write_text(json.dumps(config))
    fits = [r for r in eval_rows if length(r) + cfg.max_completion_length <= config["max_position_embeddings"]]
    tg.train(cfg, CPU)
    log = capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert 0 < len(fits) < 12 and saved["n_total"] == len(fits)
    assert f"[data] validation: {12 - len(fits)} of 12 rows skipped (prompt_too_long" in log
    assert "[data] train: " in log and "rows skipped (prompt_too_long" in log.split("[data] train: ")[1].split("\n")[0]
    # A run that evaluates nothing leaves the held-out prompts alone (and so never refuses them).
    tg.train(small_cfg(short, tmp_path / "quiet", max_steps=1, save_steps=1, eval_on_start=False, eval_on_end=False,
                       eval_max_rows=12), CPU)
    assert "[data] validation:" not in capsys.readouterr().out


def test_split_seed_fixes_the_held_out_rows_whatever_the_training_seed(tiny_model_dir, tmp_path):
    """Several training seeds on one split: the same held-out rows, in the same shuffled view, scored
    alike; without split_seed the seed draws the split, as before."""
    def predictions(name, **seeds):
        cfg = small_cfg(tiny_model_dir, tmp_path / name, eval_only=str(tiny_model_dir),
                        eval_views=["original", "shuffled"], eval_max_rows=8, eval_cache=False, **seeds)
        tg.train(cfg, CPU)
        config = json.loads((tmp_path / name / "config.json").read_text())["config"]
        scores = json.loads((tmp_path / name / "eval.json").read_text())["views"]
        return config["split_seed"], (tmp_path / name / "eval_predictions.jsonl").read_text(), scores

    split, *fixed = predictions("a", seed=1, split_seed=5)
    assert split == 5 and predictions("b", seed=2, split_seed=5) == (5, *fixed)
    assert predictions("c", seed=5) == (5, *fixed)  # split_seed defaults to the seed
    assert predictions("d", seed=2)[1] != fixed[0]


@pytest.mark.parametrize("fsdp", ["false", "true"])
def test_torchrun_two_processes_train(tiny_model_dir, tmp_path, fsdp):
    from transformers import AutoModelForCausalLM

    result = run_cli(tiny_args(tiny_model_dir, tmp_path) + [f"--fsdp={fsdp}", "--num_iterations=2",
                                                           "--gradient_accumulation_steps=2"], nproc=2)
    assert result.returncode == 0, first_error(result.stderr)
    AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-000002")
    resumed = run_cli(tiny_args(tiny_model_dir, tmp_path) + [f"--fsdp={fsdp}", "--max_steps=3", "--num_iterations=2"],
                      nproc=2)
    assert resumed.returncode == 0, first_error(resumed.stderr)
    assert "resumed from" in resumed.stdout and (tmp_path / "checkpoint-000003").exists()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert json.loads((tmp_path / "config.json").read_text())["environment"]["world_size"] == 2
    # rank 0 prints, the others stay quiet: what it will score, then the scores
    assert result.stdout.count("[eval step 2] ") == 1 and result.stdout.count("[eval step 2, ") == 1
    assert result.stdout.count("[data] all:") == 1


def test_all_bad_dataset_stops_with_one_clear_message(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"slate_items_json": [], "next_video_id": "a"}\n{broken\n', encoding="utf-8")
    result = run_cli([f"--dataset={bad}", f"--output_dir={tmp_path / 'out'}", "--model_name_or_path=unused"])
    assert result.returncode == 1
    assert "every row is bad (empty_slate=1, malformed_json:line=1)" in result.stderr
    assert "Traceback" not in result.stderr


def test_upstream_recipe_runs(tiny_model_dir, tmp_path):
    recipe = ROOT / "tests" / "fixtures" / "upstream_config_grail_gun.yaml"
    result = run_cli([f"--config={recipe}", f"--model_name_or_path={tiny_model_dir}",
                      "--dataset=data/gun_control.jsonl", f"--output_dir={tmp_path}", "--max_steps=1",
                      "--prompts_per_step=2", "--max_completion_length=8", "--eval_max_rows=4",
                      "--gradient_accumulation_steps=2", "--report_to=none"])  # it asks for wandb
    assert result.returncode == 0, result.stderr[-3000:]
    warning = [line for line in result.stdout.splitlines() if line.startswith("[config] ignored")]
    assert len(warning) == 1 and "use_vllm" in warning[0] and "kl_target" in warning[0]
    assert (tmp_path / "checkpoint-000001").exists()


def test_every_config_key_is_documented_where_users_edit_it():
    import dataclasses
    import re

    source = (ROOT / "train_grail.py").read_text(encoding="utf-8")
    commented = set(re.findall(r"^    (\w+): [\w\[\]]+ = .*  # \S", source, flags=re.M))
    assert [f.name for f in dataclasses.fields(tg.Config) if f.name not in commented] == []


def test_stop_file_raises_preempted_after_the_checkpoint(tiny_model_dir, tmp_path):
    stop = tmp_path / "STOP"
    stop.touch()
    out = tmp_path / "run"
    with pytest.raises(distributed.Preempted) as stopped:
        tg.train(small_cfg(tiny_model_dir, out, max_steps=3, save_steps=0, grail_stop_file=str(stop),
                           eval_on_start=False), CPU)
    assert stopped.value.args == (1,)  # after the first step
    assert [p.name for p in RunFolder(out).checkpoints()] == ["checkpoint-000001"] and not stop.exists()


def recording(inside, name, real):
    """`real`, noting in inside[name] whether each call ran under CPU autocast."""
    def wrapper(*args, **kwargs):
        inside[name].append(torch.is_autocast_enabled("cpu"))
        return real(*args, **kwargs)
    return wrapper


@pytest.mark.parametrize("prompt_mode", ["think", "answer"])
def test_rollouts_and_evaluation_run_under_the_training_autocast(tiny_model_dir, tmp_path, monkeypatch, prompt_mode):
    """On CUDA that is bf16 autocast; here a CPU autocast stands in for it, and every generate call
    (training rollouts; greedy and sampled evaluation in think mode) and every exact forward of the
    choice and the opinion (evaluation in answer mode) must run inside it."""
    import choices
    import rollout

    inside = {"generate": [], "choice": []}
    monkeypatch.setattr(rollout, "generate", recording(inside, "generate", rollout.generate))
    monkeypatch.setattr(choices, "answer_logprobs", recording(inside, "choice", choices.answer_logprobs))
    monkeypatch.setattr(distributed, "autocast", lambda device, cuda, cpu=False: torch.autocast("cpu", dtype=torch.bfloat16))
    tg.train(small_cfg(tiny_model_dir, tmp_path, max_steps=1, save_steps=0, prompt_mode=prompt_mode,
                       eval_samples=2, eval_max_rows=3, eval_cache=False), CPU)  # it counts forwards
    if prompt_mode == "think":  # eval before (greedy x 3 views, sampled), one rollout, eval after
        assert len(inside["generate"]) >= 9 and not inside["choice"]
    else:  # one rollout; 3 views x 3 rows, before and after
        assert len(inside["generate"]) == 1 and len(inside["choice"]) == 18
    assert all(inside["generate"] + inside["choice"])


@pytest.mark.parametrize("cpu_bf16", [True, False])
def test_cpu_bf16_autocasts_training_and_the_evaluation(tiny_model_dir, tmp_path, monkeypatch, cpu_bf16):
    """cpu_bf16: the cloning passes, the rollouts, the update's log-probs and the exact evaluation run
    under CPU bf16 autocast (one precision, so the importance ratio starts at 1; the head stays fp32,
    tests/test_choices.py); without it every pass is fp32."""
    import choices
    import grpo
    import rollout

    inside = {"generate": [], "logprobs": [], "choice": []}
    monkeypatch.setattr(rollout, "generate", recording(inside, "generate", rollout.generate))
    monkeypatch.setattr(grpo, "completion_logprobs", recording(inside, "logprobs", grpo.completion_logprobs))
    monkeypatch.setattr(choices, "answer_logprobs", recording(inside, "choice", choices.answer_logprobs))
    tg.train(small_cfg(tiny_model_dir, tmp_path, max_steps=1, save_steps=0, bc_steps=2, eval_max_rows=2,
                       eval_views=["original"], eval_cache=False, cpu_bf16=cpu_bf16), CPU)
    assert len(inside["logprobs"]) == 3  # two cloning steps, one GRPO update
    assert inside["generate"] == [cpu_bf16]
    assert len(inside["choice"]) == 4  # 2 rows before and after
    assert all(seen == cpu_bf16 for seen in inside["logprobs"] + inside["choice"])


@pytest.mark.parametrize("baseline", ["issue", "index", "viewpoint"])
def test_opinion_cloning_is_smoothed_toward_the_chosen_baseline(tiny_model_dir, tmp_path, monkeypatch, baseline):
    """bc_opinion_prior picks what every cloned row's opinion target mixes in: the issue's direction
    prior, the pre-study-index logistic or the initial viewpoint's table, each fit on the training
    split alone."""
    import choices
    import data
    import opinions

    seen = []

    def recording(tokenizer, row, prior, smoothing, opinion_prior, opinion_smoothing, end_id):
        seen.append((row, opinion_prior(row)))
        return real(tokenizer, row, prior, smoothing, opinion_prior, opinion_smoothing, end_id)

    real = choices.cloning_targets
    monkeypatch.setattr(choices, "cloning_targets", recording)
    cfg = small_cfg(tiny_model_dir, tmp_path, max_steps=1, save_steps=0, bc_steps=2, bc_opinion_smoothing=0.8,
                    bc_opinion_prior=baseline, eval_on_start=False, eval_on_end=False)
    tg.train(cfg, CPU)
    train_rows, _ = data.load_examples(cfg.dataset, cfg.val_fraction, cfg.seed, lambda *_: None)
    expected = {"issue": opinions.direction_prior, "index": opinions.index_baseline,
                "viewpoint": opinions.viewpoint_baseline}[baseline](train_rows)
    other = (opinions.index_baseline if baseline == "issue" else opinions.direction_prior)(train_rows)
    assert len(seen) == 2 * cfg.prompts_per_step
    for row, got in seen:
        assert got == pytest.approx(expected(row))
    assert any(got != pytest.approx(other(row)) for row, got in seen)  # the two baselines differ on these rows


def test_resume_settings_that_would_mislabel_a_run(tiny_model_dir, tmp_path, capsys):
    """save_steps=0 still checkpoints at the end; a resume that scores other rows does not set the
    untrained model's step-0 scores beside them; max_steps below the newest checkpoint stops."""
    tg.train(small_cfg(tiny_model_dir, tmp_path, max_steps=1, save_steps=0, eval_max_rows=6), CPU)
    assert (tmp_path / "checkpoint-000001" / "model.safetensors").exists()
    assert json.loads((tmp_path / "eval.json").read_text())["untrained"]["rows"] == ["validation", 6]
    tg.train(small_cfg(tiny_model_dir, tmp_path, max_steps=2, save_steps=0, eval_max_rows=4), CPU)
    after = json.loads((tmp_path / "eval.json").read_text())
    assert after["step"] == 2 and after["n_total"] == 4 and "untrained" not in after
    assert "[eval] the untrained model was scored on other rows (['validation', 6], now ['validation', 4])" \
        in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        tg.train(small_cfg(tiny_model_dir, tmp_path, max_steps=1, save_steps=0, eval_max_rows=4), CPU)
    assert str(exit_.value.code).startswith("[config] max_steps=1 is behind ") and "checkpoint-000002" in \
        str(exit_.value.code)


@pytest.mark.parametrize("kind", ["llama attention_dropout", "gpt2 nn.Dropout"])
def test_the_trained_policy_has_no_dropout(tiny_model_dir, tmp_path, kind):
    """Sampling and the old log-probs run in eval mode, the update in train mode: the two must agree,
    or the ratio is not 1 at the sampled policy."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

    import checkpoint

    if kind.startswith("llama"):
        model = LlamaForCausalLM.from_pretrained(tiny_model_dir, attention_dropout=0.5)
    else:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                           resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5))
    model.save_pretrained(tmp_path)
    model = checkpoint.load_model(str(tmp_path), CPU.device, trainable=True)
    ids = torch.randint(3, 50, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        trained = model.train()(ids).logits
        sampled = model.eval()(ids).logits
    assert torch.equal(trained, sampled)
