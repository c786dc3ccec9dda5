"""reports.py on run folders written by a tiny end-to-end run."""
import json
import sys

import pytest
import torch

import reports
import train_grail as tg

CPU = tg.Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


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
    for heading in ("## Configuration", "## Training curves", "### View: original", "### View: shuffled",
                    "### View: cue_neutral", "### Before and after training",
                    "### Published checkpoints on the same rows", "### Simulation quality (2 samples per row)",
                    "## Sample completions"):
        assert heading in text, heading
    original = text.split("### View: original")[1].split("###")[0]
    for predictor in ("**model**", "random", "always_first", "always_last", "most_frequent_index_train_",
                      "cue_no_duration"):
        assert predictor in original, predictor
    assert "cue_no_duration" not in text.split("### View: cue_neutral")[1].split("###")[0]
    assert "| step | total reward |" in text
    ev = json.loads((run_dirs[0] / "eval.json").read_text())
    assert reports.with_ci(ev["views"]["original"]) in original
    assert "grail_checkpoint_50" in text  # the bundled rows carry the published answers


def test_runs_side_by_side(run_dirs, tmp_path):
    text = reports.write_report(run_dirs, out=tmp_path / "both").read_text()
    table = text.split("## Runs side by side")[1].split("##")[0]
    assert "run_a" in table and "run_b" in table and "accuracy (original)" in table


def test_not_a_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no eval.json"):
        reports.write_report([tmp_path])
