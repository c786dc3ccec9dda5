"""reports.py on run folders written by a tiny end-to-end run."""
import json

import pytest

import distributed
import errors
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
                           log_completions_steps=1, eval_on_start=True, eval_on_end=True), CPU)
        dirs.append(out)
    return dirs


def test_report_holds_every_table_and_plot(run_dirs, tmp_path):
    path = reports.write_report([run_dirs[0]], out=tmp_path / "one")
    text = path.read_text()
    for heading in ("## Configuration", "## Plots", "## Evaluation: run_a", "### Accuracy before and after training",
                    "Choice distribution on 6 held-out rows, exact", "By issue / study (log-loss)",
                    "Published checkpoints on the same rows", "## Sample completions"):
        assert heading in text, heading
    for png in ("curves.png", "positions.png", "calibration.png"):
        assert f"]({png})" in text and (tmp_path / "one" / png).stat().st_size > 1000, png
    headline = text.split("Choice distribution on")[1].split("By issue")[0]
    for line in ("**model (step 2)**", "untrained (step 0)", "position prior (train, per slate size)", "uniform"):
        assert f"| {line}" in headline, line
    ev = json.loads((run_dirs[0] / "eval.json").read_text())
    assert reports.num(ev["choice_logloss"]) in headline and reports.num(ev["uniform_logloss"]) in headline
    views = text.split("Accuracy [95% CI]")[1].split("Published checkpoints")[0]
    assert "| predictor | original | shuffled | cue_neutral |" in views
    for predictor in ("**model**", "random", "always_first", "always_last", "most_frequent_index_train_",
                      "cue_no_duration"):
        assert f"| {predictor}" in views, predictor
    cue_row = next(line for line in views.splitlines() if line.startswith("| cue_no_duration"))
    assert cue_row.rstrip().endswith("|  |")  # no cue rule in the cue-neutral view
    assert reports.with_ci(ev["views"]["original"]) in views
    assert "grail_checkpoint_50" in text  # the bundled rows carry the published answers
    opinion = ev["views"]["original"]["opinion"]
    assert "Opinion distribution on" in text and "](opinion.png)" in text
    for issue, g in opinion["by_issue"].items():  # each issue's row ends with the model's and the baselines' spread
        row = next(line for line in text.splitlines() if line.startswith(f"| {issue} | {g['model']['n']} |"))
        assert row.rstrip().endswith(f"| {reports.num(g['model']['spread'])} | {reports.num(g['baseline']['spread'])} "
                                     f"| {reports.num(g['viewpoint']['spread'])} |")
        assert f"| {reports.num(g['baseline']['logloss'])} | {reports.num(g['viewpoint']['logloss'])} |" in row
    assert "| initial viewpoint's table (train participants, per issue) |" in text
    in_sample = dict(ev, split="all")  # --eval_split=all: the headline does not call the rows held out
    assert "on 6 training and held-out rows" in reports.choice_summary(in_sample)
    assert f"on {opinion['model']['n']} labelled training and held-out rows" in reports.opinion_summary(in_sample)
    assert opinion["pooled_issues"] == [] and "No training participant holds" not in text
    opinion["pooled_issues"] = ["minimum_wage"]  # an issue the training split lacks: its "per issue" prior is pooled
    assert "No training participant holds minimum_wage: there every baseline" in reports.opinion_summary(ev)


def test_eval_section_shows_what_the_trainer_prints(run_dirs):
    """One renderer for an eval dict: what the trainer prints is what the report shows."""
    ev = json.loads((run_dirs[1] / "eval.json").read_text())
    assert reports.eval_summary(ev) in reports.eval_section({"eval": ev, "evals": [], "name": "run_b"})


def test_runs_side_by_side(run_dirs, tmp_path):
    text = reports.write_report(run_dirs, out=tmp_path / "both").read_text()
    table = text.split("## Runs side by side")[1].split("##")[0]
    assert "run_a" in table and "run_b" in table and "accuracy (original)" in table and "log-loss" in table


def test_not_a_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(errors.UserError, match="no eval.json"):
        reports.write_report([tmp_path])


def test_a_run_without_evaluation_still_has_a_report(tiny_model_dir, tmp_path):
    """./run.sh --config=FILE reports whatever FILE trained, evaluated or not."""
    out = tmp_path / "plain"
    tg.train(tg.Config(model_name_or_path=str(tiny_model_dir), output_dir=str(out), prompt_mode="answer", max_steps=1,
                       prompts_per_step=2, num_generations=3, max_completion_length=6, save_steps=0), CPU)
    assert not (out / "eval.json").exists()
    text = reports.write_report([out], out=tmp_path / "report").read_text()
    assert "(none: this run evaluated nothing" in text and "## Configuration" in text and "curves.png" in text


def test_an_eval_only_report_names_the_checkpoint_it_scored(run_dirs, tiny_model_dir, tmp_path):
    checkpoint_dir = run_dirs[0] / "checkpoint-000002"
    tg.train(tg.Config(eval_only=str(checkpoint_dir), output_dir=str(tmp_path / "eval"), prompt_mode="answer",
                       max_completion_length=6, eval_max_rows=4, eval_views=["original"], eval_samples=0), CPU)
    text = reports.write_report([tmp_path / "eval"], out=tmp_path / "report").read_text()
    assert f"| `eval_only` | `{checkpoint_dir}` |" in text
    training = reports.write_report([run_dirs[0]], out=tmp_path / "training").read_text()
    assert "`eval_only`" not in training  # a training run's report has no such row


def test_disc_position_shares_count_a_missing_position_as_none_clicked():
    """A step whose slates are shorter has no pos3 keys: its shares there are 0, not left out, so each
    column of shares sums to 1; mean D averages only the steps that showed the position."""
    def step(shares, mean_d):
        out = {"disc/loss": 0.7}
        for k, ((human, policy), d) in enumerate(zip(shares, mean_d), 1):
            out.update({f"disc/pos{k}/human_share": human, f"disc/pos{k}/policy_share": policy,
                        f"disc/pos{k}/mean_d": d})
        return out

    metrics = [step([(0.5, 0.25), (0.25, 0.25), (0.25, 0.5)], [0.5, 0.5, 0.25]),
               step([(0.5, 0.5), (0.5, 0.5)], [0.5, 0.5]), {"disc/loss": 0.7}]  # a step without positions
    text = reports.disc_section({"name": "r", "metrics": metrics})
    cells = {row[0]: row[1:] for row in ([c.strip() for c in line.strip("|").split("|")]
                                         for line in text.splitlines()) if row[0] in ("1", "2", "3")}
    assert cells["3"] == [reports.num(0.125), reports.num(0.25), reports.num(0.25)]
    assert sum(float(cells[k][0]) for k in "123") == pytest.approx(1.0)
    assert sum(float(cells[k][1]) for k in "123") == pytest.approx(1.0)


def test_a_pipe_in_a_cell_stays_in_its_cell():
    """A completion or an issue named with "|" would end its cell and shift the row's numbers."""
    lines = reports.table(["issue", "log-loss"], [["guns | ammo", 0.5]]).splitlines()
    assert all(line.replace("\\|", "").count("|") == 3 for line in lines)


def test_the_positions_plot_has_every_runs_positions():
    small, large = {"1": 0.5, "2": 0.5}, {str(k): 1 / 12 for k in range(1, 13)}
    assert reports.all_positions([small, large]) == [str(k) for k in range(1, 13)]
