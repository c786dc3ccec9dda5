"""prompts.py: the upstream user prompt rebuilt byte for byte, history truncation, fallbacks, and
the chat prompt of each prompt mode, and the rows too long for the model."""
import json
from types import SimpleNamespace

import pytest

import prompts
import schema
from errors import UserError


def test_render_matches_state_text_byte_for_byte_on_every_bundled_row(bundled):
    assert len(bundled) == 1081
    mismatched = [row["id"] for row in bundled
                  if prompts.render_user_prompt(schema.clean_row(row), max_history=None) != row["state_text"]]
    assert mismatched == []


def test_render_from_json_string_columns(bundled):
    row = dict(bundled[0])
    row["slate_items_json"] = json.dumps(row["slate_items_json"])
    row["watched_detailed_json"] = json.dumps(row["watched_detailed_json"])
    assert prompts.render_user_prompt(schema.clean_row(row)) == row["state_text"]


def test_history_truncation_keeps_most_recent_and_renumbers(bundled):
    row = schema.clean_row(next(r for r in bundled if len(r["watched_detailed_json"]) == 3))
    full = prompts.render_user_prompt(row)
    short = prompts.render_user_prompt(row, max_history=1)
    newest = row["watched_detailed_json"][-1]["title"]
    oldest = row["watched_detailed_json"][0]["title"]
    assert f"1. {newest}" in short and oldest not in short.split("SURVEY")[0].split("RECENTLY")[1]
    assert "2. " not in short.split("RECENTLY WATCHED")[1].split("SURVEY")[0]
    assert prompts.render_user_prompt(row, max_history=0) == full == prompts.render_user_prompt(row, max_history=3)


def test_render_fallbacks_for_missing_fields():
    row = schema.clean_row({"slate_items_json": [{"id": "v1"}, {"id": "v2", "title": "T2", "length_seconds": 61.6}],
                          "next_video_id": "v2",
                          "watched_detailed_json": [{"title": "H", "watch_seconds": 30, "total_length": None}]})
    text = prompts.render_user_prompt(row)
    assert text.startswith("VIEWER (profile information unavailable)\n\nCURRENTLY WATCHING a video\n")
    assert "1. H (watched for 30s)" in text
    assert "1. v1 (id v1)" in text and "2. T2 (62s long)" in text
    assert "opinion on The issue" in text


def test_title_clipped_like_upstream():
    long_title = "word " * 60
    row = schema.clean_row({"slate_items_json": [{"id": "a", "title": long_title}], "next_video_id": "a"})
    line = prompts.render_user_prompt(row).split("OPTIONS\n")[1].split("\n")[0]
    assert line.endswith("...") and len(line) == len("1. ") + 160


def test_prompt_format_of_each_mode(tiny_model_dir):
    import checkpoint

    tokenizer = checkpoint.load_tokenizer(str(tiny_model_dir))
    row = schema.clean_row({"slate_items_json": [{"id": "a", "title": "A"}], "next_video_id": "a"})
    answer = prompts.PromptFormat("answer").text(tokenizer, row)
    think = prompts.PromptFormat("think").text(tokenizer, row)
    assert answer.endswith("<|im_start|>assistant\n<answer>") and prompts.ANSWER_SYSTEM_PROMPT in answer
    assert think.endswith("<|im_start|>assistant\n") and prompts.SYSTEM_PROMPT in think
    custom = prompts.PromptFormat("answer", system_prompt="Be brief.").text(tokenizer, row)
    assert "Be brief." in custom and prompts.ANSWER_SYSTEM_PROMPT not in custom


def positions(n):
    return SimpleNamespace(max_position_embeddings=n)  # a model config's only field read here


def test_rows_too_long_for_the_model_are_skipped_and_counted(tiny_model_dir, bundled):
    """Past its positions a rotary model runs on silently: a row whose prompt plus the answer's room
    exceeds them is skipped, exactly those rows (tokenized one by one), with one count on the log."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = prompts.PromptFormat("answer")
    rows = bundled[:40]
    lengths = [len(tokenizer.encode(prompt.text(tokenizer, r), add_special_tokens=False)) for r in rows]
    limit = sorted(lengths)[len(lengths) // 2] + 16  # about half the rows fit with 16 tokens of room
    logged = []
    kept = prompts.fitting_rows(rows, tokenizer, prompt, positions(limit), 16, "train", logged.append)
    assert kept == [r for r, n in zip(rows, lengths) if n + 16 <= limit] and 0 < len(kept) < len(rows)
    assert logged == [f"[data] train: {len(rows) - len(kept)} of {len(rows)} rows skipped (prompt_too_long: more "
                      f"than the model's {limit} positions with 16 answer tokens; history is capped by "
                      "grail_max_history)"]
    logged.clear()
    assert prompts.fitting_rows(rows, tokenizer, prompt, SimpleNamespace(), 16, "train", logged.append) == rows
    assert not logged  # a config without max_position_embeddings sets no limit
    fitting = prompts.fitting_rows(rows, tokenizer, prompt, positions(max(lengths) + 16), 16, "train", logged.append)
    assert fitting == rows and not logged
    with pytest.raises(UserError, match=r"^\[data\] train: every prompt is longer than the model's 20 positions"):
        prompts.fitting_rows(rows, tokenizer, prompt, positions(20), 16, "train", logged.append)


def test_the_viewpoint_in_the_opinion_question_changes_that_line_alone(bundled):
    row = schema.clean_row(bundled[0])
    plain, cued = prompts.render_user_prompt(row), prompts.render_user_prompt(row, viewpoint_in_question=True)
    assert plain == bundled[0]["state_text"]  # off: upstream's prompt
    changed = [(a, b) for a, b in zip(plain.splitlines(), cued.splitlines()) if a != b]
    assert len(plain.splitlines()) == len(cued.splitlines()) and len(changed) == 1
    assert changed[0][1] == changed[0][0].replace(
        f"opinion on {prompts.issue_label(row)} ",
        f"opinion on {prompts.issue_label(row)} (Initial Viewpoint: {row['initial_viewpoint']}) ")
    no_viewpoint = dict(row, initial_viewpoint=None)
    assert prompts.render_user_prompt(no_viewpoint, viewpoint_in_question=True) == prompts.render_user_prompt(no_viewpoint)


def test_the_prompt_of_a_config_carries_the_viewpoint_setting(bundled):
    import train_grail as tg

    cfg, _ = tg.parse_config(["--config=recipes/cpu_default.yaml"], {})
    assert prompts.PromptFormat.of(cfg).viewpoint_in_question is True
    assert prompts.PromptFormat.of(tg.parse_config([], {})[0]).viewpoint_in_question is False
