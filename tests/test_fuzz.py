"""Malformed rows: each is either used (and renders) or skipped with a counted reason; never a traceback."""
import copy
import json
import random

import pytest

import data
import prompts
import schema

ODD_TEXT = ["", " ", "\u0000", "\ufeffBOM", "e\u0301", "🙂" * 50, "\ud7ff", "a\nb\tc", "x" * 5000, "ｆｕｌｌ"]
ODD_VALUES = [None, 0, -1, 3.5, float("nan"), float("inf"), True, "12", [], {}, [1, 2], {"a": 1}, "[]", "{broken"]


def mutate(row, rng):
    row = copy.deepcopy(row)
    kind = rng.randrange(10)
    fields = list(row)
    if kind == 0:  # drop a field
        row.pop(rng.choice(fields))
    elif kind == 1:  # a field of the wrong type
        row[rng.choice(fields)] = rng.choice(ODD_VALUES)
    elif kind == 2:  # odd unicode in a text field
        row[rng.choice(["viewer_profile_sentence", "survey_highlights", "current_video_title"])] = rng.choice(ODD_TEXT)
    elif kind == 3:  # broken JSON strings
        row["slate_items_json"] = json.dumps(row["slate_items_json"])[: rng.randrange(1, 40)]
    elif kind == 4:  # empty or huge slate
        row["slate_items_json"] = [] if rng.random() < 0.5 else row["slate_items_json"] * 30
    elif kind == 5:  # gold absent
        row["next_video_id"] = "v-not-there"
    elif kind == 6:  # duplicate options
        row["slate_items_json"] = row["slate_items_json"] + row["slate_items_json"][:1]
    elif kind == 7:  # a slate item's field of the wrong type, or odd text
        item = rng.choice(row["slate_items_json"])
        item[rng.choice(list(item))] = rng.choice(ODD_VALUES + ODD_TEXT)
    elif kind == 8:  # a history item broken
        row["watched_detailed_json"] = rng.choice([[{"title": 5}], ["not a dict"], "{", [{}], None])
    else:  # extra fields and a gold index of the wrong kind
        row["unexpected"] = rng.choice(ODD_VALUES)
        row["gold_index"] = rng.choice([0, -3, 99, "2", 2.0, None, row["gold_index"]])
    return row


def test_two_hundred_malformed_rows_are_used_or_counted():
    rows = [json.loads(line) for line in (data.DATA_DIR / "gun_control.jsonl").read_text(encoding="utf-8").splitlines()[:50]]
    rng = random.Random(0)
    fuzzed = [mutate(rng.choice(rows), rng) for _ in range(400)] + ["not a row", 42, None]
    messages = []
    good, skipped = data.clean_rows(fuzzed, "fuzz", log=messages.append)
    assert len(good) + sum(skipped.values()) == len(fuzzed)  # nothing lost
    assert sum(skipped.values()) >= 200 and len(good) >= 20
    for row in good:  # a kept row is usable: it renders, its gold is in its slate, shuffling works
        text = prompts.render_user_prompt(row, max_history=12)
        assert "OPTIONS" in text and 1 <= row["gold_index"] <= row["n_options"] == len(row["slate_items_json"])
        data.shuffle_slate(row, random.Random(1))
        data.cue_neutral(row)
    assert all(":" in reason or "_" in reason for reason in skipped)
    assert messages and "skipped" in messages[0]


def test_every_row_bad_is_one_clear_error():
    with pytest.raises(data.DataError, match="every row is bad"):
        data.clean_rows([{"slate_items_json": []}, {"next_video_id": "x"}, "junk", None,
                         {"slate_items_json": "{broken", "next_video_id": "a"}], "bad", log=print)


def test_integral_float_gold_index_and_string_reference_predictions_are_read():
    row = json.loads((data.DATA_DIR / "gun_control.jsonl").read_text(encoding="utf-8").splitlines()[0])
    row.update(gold_index=float(row["gold_index"]), reference_predictions=json.dumps(row["reference_predictions"]))
    clean = schema.clean_row(row)
    assert isinstance(clean["gold_index"], int) and isinstance(clean["reference_predictions"], dict)
    assert schema.clean_row({**row, "reference_predictions": "{junk"})["reference_predictions"] == {}
