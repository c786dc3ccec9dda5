"""reports.py on run folders written by a tiny end-to-end run."""
import json
import sys

import pytest

import distributed
import reports
import train_grail as tg

CPU = distributed.single_process()


@pytest.fixture(scope="module")
def run_dirs(tiny_model_dir, tmp_path_factory):
    dirs = []
    for name, steps in (("run_a", 2), ("run_b", 1)):
        out = tmp_path_factory.mktemp("runs") / name
        tg.train(tg.Config(model_name_or_path=str(tiny_model_dir), output_dir=str(out), prompt_mode="answer",
                           max_steps=steps, prompts_per_step=2, num_generations=3, max_completion_length=6,
                           eval_max_rows=6, eval_batch_size=6, eval_samples=2, save_steps=0, learning_rate=1e-3,
                           log_completions_steps=1), CPU)
        dirs.append(out)
    return dirs


def test_report_holds_every_table(run_dirs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the no-matplotlib path: curves as tables
    path = reports.write_report([run_dirs[0]], out=tmp_path / "one")
    text = path.read_text()
    for heading in ("## Configuration", "## Training curves", "## Evaluation: run_a", "### Before and after training",
                    "Published checkpoints on the same rows", "Simulation quality (2 samples per row)",
                    "## Sample completions"):
        assert heading in text, heading
    views = text.split("Greedy accuracy [95% CI] by view")[1].split("Published checkpoints")[0]
    assert "| predictor | original | shuffled | cue_neutral |" in views
    for predictor in ("**model**", "random", "always_first", "always_last", "most_frequent_index_train_",
                      "cue_no_duration"):
        assert f"| {predictor}" in views, predictor
    cue_row = next(line for line in views.splitlines() if line.startswith("| cue_no_duration"))
    assert cue_row.rstrip().endswith("|  |")  # no cue rule in the cue-neutral view
    assert "| step | total reward |" in text
    ev = json.loads((run_dirs[0] / "eval.json").read_text())
    assert reports.with_ci(ev["views"]["original"]) in views
    assert "grail_checkpoint_50" in text  # the bundled rows carry the published answers


def test_eval_section_shows_what_the_trainer_prints(run_dirs):
    """One renderer for an eval dict: what the trainer prints is what the report shows."""
    ev = json.loads((run_dirs[1] / "eval.json").read_text())
    assert reports.eval_summary(ev) in reports.eval_section({"eval": ev, "evals": [], "name": "run_b"})


def test_runs_side_by_side(run_dirs, tmp_path):
    text = reports.write_report(run_dirs, out=tmp_path / "both").read_text()
    table = text.split("## Runs side by side")[1].split("##")[0]
    assert "run_a" in table and "run_b" in table and "accuracy (original)" in table


def test_not_a_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no eval.json"):
        reports.write_report([tmp_path])
