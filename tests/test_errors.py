"""One line for every user mistake, at every entry point (errors.py): each bad input below exits
non-zero with one line on stderr naming what failed, and no traceback; runs are never mixed or
overwritten; a stop during an evaluation ends it within one batch."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import distributed
import errors
import train_grail as tg
from outputs import append_jsonl

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def run_trainer(monkeypatch, capsys, tiny_model_dir, tmp_path):
    """Run train_grail.py's entry point in this process as `python train_grail.py ARGS` would, on the
    tiny model. Returns (exit code, stdout, stderr)."""
    def run(args, env=None, out=None):
        monkeypatch.delenv("GAIL_USE", raising=False)
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        base = [f"--model_name_or_path={tiny_model_dir}", f"--output_dir={out or tmp_path / 'run'}",
                "--prompt_mode=answer", "--max_steps=1", "--prompts_per_step=2", "--num_generations=3",
                "--max_completion_length=6", "--eval_max_rows=4", "--save_steps=1", "--learning_rate=1e-3"]
        monkeypatch.setattr(sys, "argv", ["train_grail.py", *base, *args])
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        distributed.STOP_REQUESTED.clear()
        try:
            errors.run(tg.main)
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
            if not isinstance(exit_.code, int) and exit_.code is not None:
                print(exit_.code, file=sys.stderr)  # what the interpreter prints for SystemExit("...")
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        captured = capsys.readouterr()
        return code, captured.out, captured.err
    return run


def one_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


# --- entry points ---------------------------------------------------------------------------
# (values out of range, bad keys and bad values of parse_config: tests/test_configurator.py)

@pytest.mark.parametrize("content, message", [
    (None, "[config] cannot read {path}"),
    ("learning_rate: [1e-6\nmax_steps: 3\n", "[config] {path} is not valid YAML at line"),
    ("- just\n- a list\n", "[config] {path}: expected key: value pairs, got a list"),
])
def test_bad_config_files(content, message, run_trainer, tmp_path):
    path = tmp_path / "recipe.yaml"
    if content is not None:
        path.write_text(content)
    code, _, err = run_trainer([f"--config={path}"])
    assert code == 1
    assert one_line(err).startswith(message.format(path=path))


def test_output_dir_that_is_a_file_or_cannot_be_created(run_trainer, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = run_trainer([], out=afile)
    assert code == 1 and one_line(err) == f"[output] output_dir {afile} is a file, not a folder"
    code, _, err = run_trainer([], out=afile / "run")
    assert code == 1 and one_line(err).startswith(f"[output] cannot write to output_dir {afile / 'run'}")


@pytest.mark.parametrize("target, message", [
    ("/no/such/model/folder", "[model] /no/such/model/folder: no such folder, and not a hub id"),
    ("{tmp}", "[model] {tmp} is not a model folder (no config.json)"),
    ("not a hub id!", "[model] not a hub id!: no such folder, and not a hub id"),
    ("no-such-org/no-such-model", "[model] cannot load no-such-org/no-such-model: "),  # offline here, or no such id
])
def test_eval_only_on_something_that_is_not_a_model(target, message, run_trainer, tmp_path):
    code, _, err = run_trainer([f"--eval_only={target.format(tmp=tmp_path)}"])
    assert code == 1
    assert one_line(err).startswith(message.format(tmp=tmp_path))
    if "cannot load" not in message:  # told before any folder is made or data loads (a hub id needs the hub)
        assert not (tmp_path / "run").exists()


def test_a_model_name_that_is_no_model_stops_before_the_run_folder(run_trainer, tmp_path):
    code, _, err = run_trainer([f"--model_name_or_path={tmp_path / 'typo'}"])
    assert code == 1 and one_line(err) == f"[model] {tmp_path / 'typo'}: no such folder, and not a hub id (org/name)"
    assert not (tmp_path / "run").exists()


def test_a_dataset_too_small_for_its_split(run_trainer, tmp_path, bundled):
    one_row = tmp_path / "one.jsonl"
    append_jsonl(one_row, bundled[:1])
    code, _, err = run_trainer([f"--dataset={one_row}", "--eval_on_end=true"])
    assert code == 1 and one_line(err).startswith("[data] the validation split is empty (1 train, 0 validation rows)")
    # Evaluated on its training row instead, the single-row dataset runs (it crashed once).
    code, out, err = run_trainer([f"--dataset={one_row}", "--eval_split=train", "--eval_on_start=true"],
                                 out=tmp_path / "run2")
    assert code == 0, err
    assert json.loads((tmp_path / "run2" / "eval.json").read_text())["n_total"] == 1


def test_an_empty_dataset_and_a_discriminator_that_is_not_there(run_trainer, tmp_path, monkeypatch):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _, err = run_trainer([f"--dataset={empty}"])
    assert code == 1 and one_line(err) == "[data] all: no rows at all; nothing to train or evaluate on"
    code, _, err = run_trainer([f"--dataset={tmp_path / 'missing.jsonl'}"])
    assert code == 1 and one_line(err).startswith("[data] data files not found")
    code, _, err = run_trainer(["--val_fraction=1"])
    assert code == 1 and one_line(err).startswith("[data] no training rows")
    code, _, err = run_trainer(["--gail_use=true", f"--gail_disc_model={tmp_path / 'no_encoder'}"])
    assert code == 1 and one_line(err) == f"[model] {tmp_path / 'no_encoder'}: no such folder, and not a hub id " \
                                          "(org/name)"
    import importlib.util

    find_spec = importlib.util.find_spec  # wandb is optional: as on a machine without it
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    code, _, err = run_trainer(["--report_to=wandb"])
    assert code == 1 and one_line(err).startswith("[config] report_to=['wandb'] needs wandb")
    assert not (tmp_path / "run").exists()  # none of these mistakes leaves a run folder behind
    encoder = tmp_path / "encoder"  # a folder that is no encoder still fails where it is loaded, in one line
    encoder.mkdir()
    (encoder / "config.json").write_text("{}")
    code, _, err = run_trainer(["--gail_use=true", f"--gail_disc_model={encoder}"])
    assert code == 1 and one_line(err).startswith(f"[model] cannot load the discriminator {encoder}")


def test_data_cli_on_a_file_of_bad_rows_prints_the_counted_reasons(tmp_path, bundled):
    rows = [dict(row) for row in bundled[:3]]
    rows[0]["slate_items_json"] = []
    rows[1]["gold_index"] = 99
    rows[2] = "not an object"
    path = tmp_path / "bad.jsonl"
    append_jsonl(path, rows)
    result = subprocess.run([sys.executable, "data.py", str(path)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert line.startswith("[data] train: every row is bad (") and "empty_slate=1" in line, line


def test_reports_and_benches_name_their_mistake(tmp_path):
    for argv, message in [(["reports.py", str(tmp_path)], f"[report] {tmp_path}: no eval.json"),
                          (["-m", "bench.steps", "--no_such=1"], "[bench] unknown option --no_such=1"),
                          (["-m", "bench.memory", "--generations=two"], "[bench] --generations=two: expected int")]:
        result = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 1, result.stderr
        assert one_line(result.stderr).startswith(message)


def test_an_unforeseen_failure_is_one_line_unless_debugging(monkeypatch, capsys):
    def broken():
        raise RuntimeError("first line\nsecond line")

    with pytest.raises(SystemExit) as exit_:
        errors.run(broken)
    assert exit_.value.code == "[error] RuntimeError: first line (GRAIL_DEBUG=1 shows the traceback)"
    monkeypatch.setenv("GRAIL_DEBUG", "1")
    with pytest.raises(RuntimeError):
        errors.run(broken)


def test_ctrl_c_is_one_line(monkeypatch, run_trainer):
    def interrupted(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(tg, "train", interrupted)
    code, _, err = run_trainer([])
    assert code == errors.INTERRUPTED_EXIT_CODE
    assert one_line(err) == "[stop] interrupted (Ctrl-C)"


# --- runs are never mixed or overwritten ------------------------------------------------------

def test_resume_refuses_another_experiment_and_allows_schedule_changes(run_trainer, tmp_path):
    assert run_trainer([])[0] == 0
    code, _, err = run_trainer(["--num_generations=4", "--learning_rate=2e-3", "--max_steps=2"])
    assert code == 1
    line = one_line(err)
    assert "learning_rate: 0.001 -> 0.002; num_generations: 3 -> 4" in line and "max_steps" not in line, line
    code, out, err = run_trainer(["--max_steps=2", "--save_steps=2"])
    assert code == 0, err
    assert "[config] changed since the run began: max_steps: 1 -> 2; save_steps: 1 -> 2" in out
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_resume_false_and_eval_only_never_overwrite_a_run(run_trainer, tmp_path):
    run = tmp_path / "run"
    assert run_trainer([])[0] == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, _, err = run_trainer(["--resume=false"])
    assert code == 1 and "already holds a run and resume=false never overwrites it" in one_line(err)
    code, _, err = run_trainer([f"--eval_only={run / 'checkpoint-000001'}", f"--output_dir={run}"])
    assert code == 1 and "holds a training run; an evaluation writes to its own output_dir" in one_line(err)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_eval_only_uses_its_own_folder_and_the_checkpoints_prompt_and_split(run_trainer, tmp_path, monkeypatch):
    assert run_trainer(["--split_seed=5", "--val_fraction=0.3"])[0] == 0
    monkeypatch.chdir(tmp_path)
    checkpoint_dir = tmp_path / "run" / "checkpoint-000001"
    cfg, _ = tg.parse_config([f"--eval_only={checkpoint_dir}"], {})
    assert (cfg.prompt_mode, cfg.max_completion_length) == ("answer", 6)  # not the think-mode defaults
    assert (cfg.split_seed, cfg.val_fraction) == (5, 0.3)  # its held-out participants, not the seed's
    assert tg.parse_config([f"--eval_only={checkpoint_dir}", "--split_seed=7"], {})[0].split_seed == 7
    assert cfg.output_dir == str(Path("out") / "eval-run-checkpoint-000001")
    assert tg.parse_config([f"--eval_only={checkpoint_dir}", "--prompt_mode=think"], {})[0].prompt_mode == "think"


def test_a_checkpoint_from_before_split_seed_is_scored_on_the_split_its_seed_drew(tmp_path):
    import checkpoint

    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 2, "config": {"seed": 7, "prompt_mode": "answer"}}))
    assert checkpoint.eval_settings(tmp_path) == {"prompt_mode": "answer", "split_seed": 7,
                                                  "viewpoint_in_question": False}


def test_eval_only_scores_the_data_the_checkpoint_trained_on(run_trainer, tmp_path, bundled, monkeypatch):
    """Its held-out participants are those of its own data: the bundled data's split of the same
    seed would hold other people (and rows it trained on)."""
    rows = tmp_path / "rows.jsonl"
    append_jsonl(rows, bundled[:60])
    assert run_trainer([f"--dataset={rows}"])[0] == 0
    monkeypatch.chdir(tmp_path)
    checkpoint_dir = tmp_path / "run" / "checkpoint-000001"
    assert tg.parse_config([f"--eval_only={checkpoint_dir}"], {})[0].dataset == str(rows)
    assert tg.parse_config([f"--eval_only={checkpoint_dir}", "--dataset="], {})[0].dataset == ""


def test_training_on_a_source_with_only_a_held_out_split_says_what_to_do(run_trainer, tmp_path, bundled):
    folder = tmp_path / "rows"
    folder.mkdir()
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in bundled[:4]), encoding="utf-8")
    code, _, err = run_trainer([f"--dataset={folder}"])
    assert code != 0 and "the source holds only a held-out split" in err and "--eval_only" in err


def test_a_damaged_newest_checkpoint_is_named_and_passed_over(run_trainer, tmp_path):
    run = tmp_path / "run"
    assert run_trainer(["--max_steps=2"])[0] == 0
    weights = run / "checkpoint-000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    code, out, err = run_trainer(["--max_steps=3"])
    assert code == 0, err
    assert f"[checkpoint] skipping {run / 'checkpoint-000002'}: model.safetensors is truncated" in out
    assert "resumed from " + str(run / "checkpoint-000001") in out
    # With no usable checkpoint at all, it stops rather than silently starting over.
    for path in run.glob("checkpoint-*"):
        (path / "optimizer.pt").unlink()
    code, _, err = run_trainer(["--max_steps=4"])
    assert code == 1
    line = one_line(err)
    assert line.startswith("[checkpoint] no usable checkpoint to resume from") and "optimizer.pt is missing" in line


# --- stopping -----------------------------------------------------------------------------------

@pytest.mark.parametrize("eval_only", [False, True])
def test_a_stop_during_an_evaluation_ends_it_within_one_batch(eval_only, run_trainer, tmp_path, tiny_model_dir):
    stop_file = tmp_path / "stop"
    stop_file.write_text("")
    args = [f"--grail_stop_file={stop_file}", "--eval_max_rows=0", "--eval_split=all"]  # every row: minutes
    args += [f"--eval_only={tiny_model_dir}", f"--output_dir={tmp_path / 'eval'}"] if eval_only \
        else ["--eval_on_start=true"]
    code, out, err = run_trainer(args)
    assert code == tg.PREEMPTED_EXIT_CODE, err
    assert "Traceback" not in err
    assert ("[stop] evaluation stopped on request: nothing written" if eval_only
            else "[stop] requested before the first step") in out
    assert not stop_file.exists()  # consumed: a restart does not stop again
    assert not (tmp_path / ("eval" if eval_only else "run") / "eval.json").exists()


# --- the command line agrees with the docs ------------------------------------------------------

def test_list_syntax_and_key_space_value():
    cfg, _ = tg.parse_config(["--reward_funcs=[accuracy,format]", "--reward_weights", "[1, 0.5]",
                              "--learning_rate", "3e-6", "--eval_views='original'"], {})
    assert cfg.reward_funcs == ["accuracy", "format"] and cfg.reward_weights == [1.0, 0.5]
    assert cfg.learning_rate == 3e-6 and cfg.eval_views == ["original"]


def test_report_to_tensorboard_writes_event_files(run_trainer, tmp_path):
    code, _, err = run_trainer(["--report_to=tensorboard", "--max_steps=2", "--eval_on_end=true"])
    assert code == 0, err
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "loss" in tags and "eval/choice_logloss" in tags
    assert [e.step for e in events.Scalars("loss")] == [1, 2]


def test_run_sh_reports_the_run_its_config_file_names(tmp_path, tiny_model_dir):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"model_name_or_path: {tiny_model_dir}\noutput_dir: {tmp_path / 'from_file'}\n"
                      "prompt_mode: answer\nmax_steps: 1\nprompts_per_step: 2\nnum_generations: 3\n"
                      "max_completion_length: 6\neval_max_rows: 4\neval_on_end: true\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.pop("GAIL_USE", None)
    result = subprocess.run(["./run.sh", "--config", str(recipe)], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (ROOT / "reports" / "from_file" / "README.md").exists()
    config = json.loads((tmp_path / "from_file" / "config.json").read_text())["config"]
    assert config["bc_steps"] == 0 and config["max_completion_length"] == 6  # cpu_default.yaml not merged in
    shutil.rmtree(ROOT / "reports" / "from_file")


def test_run_sh_on_gpus_checks_the_config_in_one_line(tmp_path):
    """The GPU branch checks the config once before torchrun starts the ranks: a mistake is one line,
    not a traceback (SLURM_GPUS_ON_NODE stands in for the GPUs; the check stops before torchrun)."""
    env = dict(os.environ, SLURM_GPUS_ON_NODE="2", CUDA_VISIBLE_DEVICES="")
    env.pop("GAIL_USE", None)
    result = subprocess.run(["./run.sh", f"--model_name_or_path={tmp_path / 'typo'}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert one_line(result.stderr) == f"[model] {tmp_path / 'typo'}: no such folder, and not a hub id (org/name)"


def test_run_sh_ablation_arms(tmp_path, tiny_model_dir):
    """The ablation's arms train what their names say, a subset on request, into one report."""
    name = f"test-ablation-{os.getpid()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", ABLATION_NAME=name,
               ABLATION_ARMS="grail_proper disc_only")
    small = [f"--model_name_or_path={tiny_model_dir}", "--max_steps=1", "--prompts_per_step=2", "--num_generations=3",
             "--eval_max_rows=4", "--eval_on_start=false", "--gail_warmup_steps=1", "--gail_disc_batch=4"]
    try:
        result = subprocess.run(["./run.sh", "ablation", *small], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        arms = {arm: json.loads((ROOT / "out" / name / arm / "config.json").read_text())["config"]
                for arm in ("grail_proper", "disc_only")}
        assert not (ROOT / "out" / name / "accuracy").exists()
        assert arms["grail_proper"]["gail_use"] and arms["grail_proper"]["reward_funcs"] == ["calibration", "format"]
        assert arms["grail_proper"]["scale_rewards"] == "batch" and arms["grail_proper"]["bc_steps"] == 0
        assert arms["disc_only"]["gail_use"] and arms["disc_only"]["reward_weights"] == [0.0]
        report = (ROOT / "reports" / name / "README.md").read_text()
        assert "grail_proper" in report and "disc_only" in report and "## Runs side by side" in report
        env["ABLATION_ARMS"] = "grail"
        del env["ABLATION_NAME"]  # the default names are computed too (and nothing runs)
        wrong = subprocess.run(["./run.sh", "ablation", *small], cwd=ROOT, env=env, capture_output=True, text=True)
        assert wrong.returncode != 0 and wrong.stderr.strip().splitlines() == [
            "[config] ABLATION_ARMS: no arm 'grail' (arms: accuracy calibration grail_upstream grail_proper disc_only)"]
    finally:
        shutil.rmtree(ROOT / "out" / name, ignore_errors=True)
        shutil.rmtree(ROOT / "reports" / name, ignore_errors=True)


def test_run_sh_ablation_from_one_cloned_start(tiny_model_dir):
    """ABLATION_START=cloned trains the default job once and starts every arm from its checkpoint."""
    name = f"test-ablation-cloned-{os.getpid()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", ABLATION_NAME=name,
               ABLATION_START="cloned", ABLATION_ARMS="accuracy calibration")
    small = [f"--model_name_or_path={tiny_model_dir}", "--max_steps=1", "--prompts_per_step=2", "--num_generations=3",
             "--eval_max_rows=4", "--bc_steps=2", "--learning_rate=5e-6"]
    try:
        result = subprocess.run(["./run.sh", "ablation", *small], cwd=ROOT, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        read = lambda arm: json.loads((ROOT / "out" / name / arm / "config.json").read_text())["config"]
        start = read("start")
        assert start["bc_steps"] == 2 and start["max_steps"] == 2 and start["model_name_or_path"] == str(tiny_model_dir)
        recipe = tg.parse_config(["--config=recipes/cpu_default.yaml"], {})[0]
        assert start["learning_rate"] == recipe.learning_rate != 5e-6  # the recipe's, not the arms'
        assert start["gradient_accumulation_steps"] == 1  # the arms' batch is theirs alone
        for arm in ("accuracy", "calibration"):
            config = read(arm)
            assert config["model_name_or_path"] == f"out/{name}/start/checkpoint-000002"
            assert config["bc_steps"] == 0 and config["max_steps"] == 1 and not config["eval_on_start"]
            assert config["learning_rate"] == 5e-6 and config["gradient_accumulation_steps"] == 4
        assert read("accuracy")["reward_funcs"] == ["accuracy", "format"]
        report = (ROOT / "reports" / name / "README.md").read_text()
        assert all(f"| {arm} |" in report for arm in ("start", "accuracy", "calibration")), report
    finally:
        shutil.rmtree(ROOT / "out" / name, ignore_errors=True)
        shutil.rmtree(ROOT / "reports" / name, ignore_errors=True)
