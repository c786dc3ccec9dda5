import copy
import json
import random
import subprocess
import sys
from collections import Counter

import pytest

import data
import prompts
import schema


BAD_ROWS = {
    "missing_field:slate_items_json": {"next_video_id": "a"},
    "empty_slate": {"slate_items_json": [], "next_video_id": "a"},
    "gold_not_in_slate": {"slate_items_json": [{"id": "a", "title": "A"}], "next_video_id": "zzz"},
    "gold_index_out_of_range": {"slate_items_json": [{"id": "a", "title": "A"}], "gold_index": 2},
    "gold_mismatch": {"slate_items_json": [{"id": "a", "title": "A"}, {"id": "b", "title": "B"}],
                      "next_video_id": "a", "gold_index": 2},
    "malformed_json:slate_items_json": {"slate_items_json": "[{\"id\": ", "next_video_id": "a"},
    "wrong_type:slate_items_json": {"slate_items_json": {"id": "a"}, "next_video_id": "a"},
    "wrong_type:slate_items_json.title": {"slate_items_json": [{"id": "a", "title": ["A"]}], "next_video_id": "a"},
    "wrong_type:viewer_profile_sentence": {"slate_items_json": [{"id": "a", "title": "A"}], "next_video_id": "a",
                                           "viewer_profile_sentence": 42},
    "wrong_type:gold_index": {"slate_items_json": [{"id": "a", "title": "A"}], "gold_index": "first"},
    "missing_field:next_video_id": {"slate_items_json": [{"id": "a", "title": "A"}]},
    "gold_ambiguous": {"slate_items_json": [{"id": "a", "title": "A"}, {"id": "a", "title": "A"}],
                       "next_video_id": "a"},
    "slate_too_large": {"slate_items_json": [{"id": str(i), "title": "x"} for i in range(60)],
                        "next_video_id": "1"},
}


@pytest.mark.parametrize("reason", sorted(BAD_ROWS))
def test_each_bad_row_kind_is_skipped_and_counted(reason, bundled, capsys):
    good, skipped = data.clean_rows([bundled[0], BAD_ROWS[reason], bundled[1]], "mixed")
    assert len(good) == 2
    assert skipped == Counter({reason: 1})
    assert f"2 rows kept, 1 skipped ({reason}=1)" in capsys.readouterr().out


def test_an_unusable_opinion_field_is_dropped_and_counted_and_the_row_kept(bundled, capsys):
    """The click of a row is good without its opinion: a label or index that cannot be read costs
    that field (counted), never the row; spelling and numeric strings are read as meant."""
    given = [("Increase", 0.2), (" No  change ", "0.5"), ("no-change", 1), ("", 0.3), ("up", float("nan")),
             (None, "95%"), ("decrease", 55), ("decrease", -0.1), ("increase", True)]
    rows = [dict(bundled[i], opinion_direction=d, opinion_before=b) for i, (d, b) in enumerate(given)]
    good, skipped = data.clean_rows(rows, "mixed")
    assert not skipped and len(good) == len(given)
    assert [r["opinion_direction"] for r in good] == ["increase", "no_change", "no_change", None, None, None,
                                                     "decrease", "decrease", "increase"]
    assert [r["opinion_before"] for r in good] == [0.2, 0.5, 1, 0.3, None, None, None, None, None]
    # NaN is pandas' "missing": no value, nothing to count.
    assert ("unreadable fields dropped, the rows kept (opinion_before:not_a_number=2, opinion_before:outside_0_1=2, "
            "opinion_direction:unknown=1)") in capsys.readouterr().out


def test_numbers_where_text_is_expected_are_read_as_text(bundled):
    slate = [dict(item, id=k) for k, item in enumerate(bundled[0]["slate_items_json"], 100)]
    row = dict(bundled[0], participant_key=1234, participant_study=2.0, gold_index=str(bundled[0]["gold_index"]),
               watched_detailed_json="", slate_items_json=slate, next_video_id=99 + bundled[0]["gold_index"])
    clean = schema.clean_row(row)
    assert (clean["participant_key"], clean["participant_study"]) == ("1234", "2")
    assert [item["id"] for item in clean["slate_items_json"]] == [str(k) for k in range(100, 100 + len(slate))]
    assert clean["gold_index"] == bundled[0]["gold_index"] and clean["watched_detailed_json"] == []
    assert schema.clean_row(dict(row, watched_detailed_json="null"))["watched_detailed_json"] == []
    for bad in ("²", "2.5", "-1"):  # not a plain number: the usual counted skip, never a crash
        with pytest.raises(schema.BadRow, match="wrong_type:gold_index"):
            schema.clean_row(dict(row, gold_index=bad, next_video_id=None))
    huge = dict(row, opinion_before=10 ** 400, slate_items_json=[dict(slate[0], view_count=10 ** 400)], gold_index=1,
                next_video_id=None)
    clean = schema.clean_row(huge)  # an int too large for a float is not a number: dropped, the row kept
    assert clean["opinion_before"] is None and "view_count" not in clean["slate_items_json"][0]
    assert "OPTIONS" in prompts.render_user_prompt(clean)


def test_counts_written_as_text_are_read_and_unreadable_ones_dropped_and_counted(bundled, capsys):
    """A count is only displayed: "14536" (a CSV's) is read as the number, a word or a boolean costs
    that count (counted), never the row's click."""
    slate = [dict(item) for item in bundled[0]["slate_items_json"]]
    slate[0].update(view_count="14536", like_count="many", comment_count=True, length_seconds=" 250.5 ")
    slate[1]["view_count"] = " "  # blank: no count
    history = [{"id": "h", "title": "H", "watch_seconds": "403", "total_length": 10 ** 400}]
    good, skipped = data.clean_rows([dict(bundled[0], slate_items_json=slate, watched_detailed_json=history)], "t")
    item, seen = good[0]["slate_items_json"][0], good[0]["watched_detailed_json"][0]
    assert not skipped and (item["view_count"], item["length_seconds"], seen["watch_seconds"]) == (14536, 250.5, 403)
    assert "like_count" not in item and "comment_count" not in item and "total_length" not in seen
    assert good[0]["slate_items_json"][1]["view_count"] is None
    assert "views 14,536" in prompts.render_user_prompt(good[0])
    assert ("slate_items_json.comment_count:not_a_number=1, slate_items_json.like_count:not_a_number=1, "
            "watched_detailed_json.total_length:not_a_number=1") in capsys.readouterr().out


def test_nan_is_a_missing_value_not_a_broken_row(bundled):
    """pandas and parquet write a missing value as NaN: an optional id, a count, or a gold index
    that next_video_id gives are absent, not wrong."""
    nan = float("nan")
    slate = [dict(item) for item in bundled[0]["slate_items_json"]]
    slate[0]["view_count"] = nan
    row = dict(bundled[0], id=nan, participant_study=nan, gold_index=nan, slate_items_json=slate,
               reference_predictions={"a": nan, "b": 2.0, "c": "2", "d": "two"})
    dropped = Counter()
    clean = schema.clean_row(row, dropped)
    assert clean["gold_index"] == bundled[0]["gold_index"] and len(clean["id"]) == 16  # a missing id: derived
    assert clean["participant_study"] is None and clean["slate_items_json"][0]["view_count"] is None
    assert clean["reference_predictions"] == {"a": None, "b": 2, "c": 2}
    assert dropped == Counter({"reference_predictions:unreadable": 1})


def test_a_row_without_an_id_gets_one_from_its_content(bundled):
    """eval_predictions.jsonl matches a prediction to its row by id: one the data lacks is derived,
    the same for the same row and different for another."""
    first, again, other = (schema.clean_row({k: v for k, v in r.items() if k != "id"})
                           for r in (bundled[0], bundled[0], bundled[1]))
    assert first["id"] == again["id"] != other["id"] and len(first["id"]) == 16
    assert schema.clean_row(bundled[0])["id"] == bundled[0]["id"]  # a given id is kept


def test_an_empty_next_video_id_is_no_id(bundled):
    clean = schema.clean_row(dict(bundled[0], next_video_id=""))
    assert clean["gold_index"] == bundled[0]["gold_index"]
    with pytest.raises(schema.BadRow, match="missing_field:next_video_id"):
        schema.clean_row(dict(bundled[0], next_video_id="", gold_index=None))


def test_json_lines_with_unicode_line_separators_and_a_byte_order_mark(tmp_path, bundled):
    """json.dumps(ensure_ascii=False) leaves U+2028 and U+0085 unescaped inside strings; an editor
    may start the file with a byte-order mark. Neither splits or breaks a row."""
    odd = dict(bundled[0], current_video_title="Gun\u2028control \x85 talk\u2029")
    path = tmp_path / "rows.jsonl"
    path.write_text("\ufeff" + json.dumps(odd, ensure_ascii=False) + "\n" + json.dumps(bundled[1], ensure_ascii=False)
                    + "\r\n", encoding="utf-8")
    good, skipped = data.clean_rows(data.load_raw(str(path))["train"])
    assert not skipped and [r["id"] for r in good] == [bundled[0]["id"], bundled[1]["id"]]
    assert good[0]["current_video_title"] == odd["current_video_title"]
    array = tmp_path / "rows.json"
    array.write_text("\ufeff" + json.dumps([bundled[0], bundled[1]]), encoding="utf-8")
    assert len(data.load_raw(str(array))["train"]) == 2
    pretty = tmp_path / "row.json"  # one row, pretty-printed: one row, not one bad row per line
    pretty.write_text(json.dumps(bundled[0], indent=2), encoding="utf-8")
    assert [r["id"] for r in data.clean_rows(data.load_raw(str(pretty))["train"])[0]] == [bundled[0]["id"]]
    lines = tmp_path / "lines.json"  # JSON lines in a .json file, as `datasets` reads them too
    write_rows(lines, bundled[:2])
    assert len(data.clean_rows(data.load_raw(str(lines))["train"])[0]) == 2


def test_bytes_that_are_not_utf8_are_replaced_and_counted_not_silent(tmp_path, bundled):
    """A title with a Latin-1 byte is still a click: the row is kept, the byte read as U+FFFD, and
    the file's bad sequences counted on one line (a genuine U+FFFD in the text is not counted)."""
    odd = dict(bundled[0], current_video_title="Caf\ufffd talk")
    path = tmp_path / "rows.jsonl"
    latin1 = json.dumps(odd, ensure_ascii=False).encode("utf-8").replace(b"talk", b"t\xe9lk\xff")
    path.write_bytes(latin1 + b"\n" + json.dumps(bundled[1]).encode("utf-8") + b"\n")
    lines = []
    good, skipped = data.clean_rows(data.load_raw(str(path), log=lines.append)["train"])
    assert not skipped and len(good) == 2
    assert good[0]["current_video_title"] == "Caf\ufffd t\ufffdlk\ufffd"
    assert lines == [f"[data] {path}: 2 invalid UTF-8 sequences read as U+FFFD (the rows kept)"]
    clean = tmp_path / "clean.jsonl"
    clean.write_text(json.dumps(odd, ensure_ascii=False) + "\n", encoding="utf-8")
    lines.clear()
    assert len(data.load_raw(str(clean), log=lines.append)["train"]) == 1 and lines == []


@pytest.mark.parametrize("spelling", ["{a},{b}", "{a}, {b}", "[{a}, {b}]", " {a} ,{b} "])
def test_a_list_of_files_however_it_is_spelled(spelling, tmp_path, bundled):
    write_rows(tmp_path / "a.jsonl", bundled[:2])
    write_rows(tmp_path / "b.jsonl", bundled[2:5])
    assert len(data.load_raw(spelling.format(a=tmp_path / "a.jsonl", b=tmp_path / "b.jsonl"))["train"]) == 5


def test_a_row_given_twice_is_kept_once_and_counted(tmp_path, bundled, capsys):
    path = tmp_path / "rows.jsonl"
    write_rows(path, bundled[:3])
    good, skipped = data.clean_rows(data.load_raw([str(path), str(path)])["train"])
    assert [r["id"] for r in good] == [r["id"] for r in bundled[:3]]
    assert skipped == Counter({"duplicate_row": 3})
    edited = dict(bundled[0], current_video_title="another title")  # same id, another row: both kept
    assert len(data.clean_rows([bundled[0], edited])[0]) == 2


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_files_named_after_splits_are_those_splits(tmp_path, bundled, capsys):
    """train.jsonl beside validation.jsonl (the hub's data-file convention) is a given split, never
    re-split; a test split beside a validation split is set aside, never trained on."""
    write_rows(tmp_path / "train.jsonl", bundled[:10])
    write_rows(tmp_path / "validation.jsonl", bundled[10:14])
    write_rows(tmp_path / "test.jsonl", bundled[14:20])
    train, val = data.load_examples(str(tmp_path), 0.5, 42)
    assert [r["id"] for r in train] == [r["id"] for r in bundled[:10]]
    assert [r["id"] for r in val] == [r["id"] for r in bundled[10:14]]
    assert "[data] test: 6 rows set aside (a held-out split; validation is evaluated)" in capsys.readouterr().out
    (tmp_path / "extra.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(data.DataError, match="some files are named after a split .* and some not \\(extra.jsonl\\)"):
        data.load_raw(str(tmp_path))


@pytest.mark.parametrize("names, splits", [
    (("train-00000-of-00002.jsonl", "train-00001-of-00002.jsonl", "test-00000-of-00001.jsonl"), {"train", "test"}),
    (("train.jsonl", "dev.jsonl"), {"train", "validation"}), (("training.json", "valid.json"), {"train", "validation"}),
    (("gun_control.jsonl", "minimum_wage.jsonl"), {"train"})])
def test_split_names_as_the_hub_writes_them(tmp_path, bundled, names, splits):
    for name in names:
        write_rows(tmp_path / name, bundled[:2])
    assert set(data.load_raw(str(tmp_path))) == splits
    assert (data.split_name("unsupervised"), data.split_name("Validation")) == (None, "validation")


def test_a_saved_dataset_with_a_test_split_never_trains_on_it(tmp_path, bundled):
    import datasets

    table = lambda rows: datasets.Dataset.from_list([dict(r, slate_items_json=json.dumps(r["slate_items_json"]),
                                                          watched_detailed_json=json.dumps(r["watched_detailed_json"]),
                                                          reference_predictions="{}") for r in rows])
    datasets.DatasetDict({"train": table(bundled[:8]), "dev": table(bundled[8:12]),
                          "test": table(bundled[12:20])}).save_to_disk(str(tmp_path / "saved"))
    train, val = data.load_examples(str(tmp_path / "saved"), 0.1, 42, log=lambda *_: None)
    assert len(train) == 8 and [r["id"] for r in val] == [r["id"] for r in bundled[8:12]]  # dev is validation


def test_a_source_with_only_a_held_out_split_has_no_training_rows(tmp_path, bundled):
    write_rows(tmp_path / "test.jsonl", bundled[:5])
    train, val = data.load_examples(str(tmp_path), 0.1, 42, log=lambda *_: None)
    assert train == [] and len(val) == 5


def test_all_bad_dataset_stops_with_reasons():
    with pytest.raises(data.DataError, match="every row is bad.*empty_slate=1.*gold_not_in_slate=1"):
        data.clean_rows([BAD_ROWS["empty_slate"], BAD_ROWS["gold_not_in_slate"]], "bad")


def test_malformed_jsonl_line_is_counted(tmp_path, bundled):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(bundled[0]) + "\n{not json\n" + json.dumps(bundled[1]) + "\n", encoding="utf-8")
    good, skipped = data.clean_rows(data.load_raw(str(path))["train"])
    assert len(good) == 2 and skipped == Counter({"malformed_json:line": 1})


def test_sources_jsonl_parquet_and_save_to_disk_agree(tmp_path, bundled):
    import datasets

    rows = bundled[:20]
    table = [dict(r, slate_items_json=json.dumps(r["slate_items_json"]),
                  watched_detailed_json=json.dumps(r["watched_detailed_json"]),
                  reference_predictions=json.dumps(r["reference_predictions"])) for r in rows]
    ds = datasets.Dataset.from_list(table)
    ds.to_parquet(str(tmp_path / "rows.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    for source in ("rows.jsonl", "rows.parquet", "saved"):
        good, skipped = data.clean_rows(data.load_raw(str(tmp_path / source))["train"], source)
        assert not skipped
        assert [prompts.render_user_prompt(r) for r in good] == [r["state_text"] for r in rows], source


def test_participant_split_is_disjoint_stratified_and_seeded(bundled):
    rows, _ = data.clean_rows(bundled)
    train, val = data.split_by_participant(rows, 0.2, seed=3)
    assert {r["participant_key"] for r in train}.isdisjoint({r["participant_key"] for r in val})
    assert len(train) + len(val) == len(rows)
    assert {r["participant_study"] for r in val} == {"study1", "study2", "study3"}
    again, _ = data.split_by_participant(list(reversed(rows)), 0.2, seed=3)
    assert sorted(r["id"] for r in again) == sorted(r["id"] for r in train)
    other, _ = data.split_by_participant(rows, 0.2, seed=4)
    assert sorted(r["id"] for r in other) != sorted(r["id"] for r in train)


def test_every_issue_with_two_participants_is_scored(bundled):
    """round(4 x 0.1) is 0: a small issue would never be held out, and never scored."""
    rows, _ = data.clean_rows(bundled)
    small = [dict(row, issue="climate", participant_key=f"c{i}", id=f"c{i}") for i, row in enumerate(bundled[:4])]
    alone = [dict(bundled[4], issue="ai", participant_key="a0", id="a0")]
    train, val = data.split_by_participant(rows + small + alone, 0.1, seed=42)
    assert sum(r["issue"] == "climate" for r in val) == 1 and sum(r["issue"] == "climate" for r in train) == 3
    assert [r["id"] for r in train if r["issue"] == "ai"] == ["a0"]  # one participant: nothing to hold out
    _, before = data.split_by_participant(rows, 0.1, seed=42)
    assert [r["id"] for r in val if r["issue"] != "climate"] == [r["id"] for r in before]  # the rest as it was


def test_a_shipped_split_that_shares_participants_says_so(tmp_path, bundled, capsys):
    write_rows(tmp_path / "train.jsonl", bundled[:40])
    write_rows(tmp_path / "validation.jsonl", bundled[30:50])
    data.load_examples(str(tmp_path), 0.1, 0)
    shared = {r["participant_key"] for r in bundled[:40]} & {r["participant_key"] for r in bundled[30:50]}
    rows = sum(r["participant_key"] in shared for r in bundled[30:50])
    assert shared and f"{len(shared)} participants are in both train and validation ({rows} validation rows)" \
        in capsys.readouterr().out


def test_participant_key_falls_back_to_viewer_hash(bundled):
    row = dict(bundled[0])
    expected = row.pop("participant_key")
    assert schema.participant_key(row) == expected  # the data README defines the key this way


def test_rows_that_name_no_participant_are_counted(bundled, capsys):
    """Without participant_key and viewer fields every row hashes to one participant, which the split
    cannot separate: the rows are kept and counted, those with a name are not."""
    nameless = [{k: v for k, v in r.items() if k not in ("participant_key", *schema.VIEWER_FIELDS)} for r in bundled[:3]]
    rows, _ = data.clean_rows(nameless + bundled[3:5], "train")
    assert len(rows) == 5 and {r["participant_key"] for r in rows[:3]} == {schema.NAMELESS_KEY}
    assert ("[data] train: 3 rows name no participant (no participant_key, no viewer fields): they count as one "
            "participant, so the participant split keeps them all on one side") in capsys.readouterr().out
    data.clean_rows(bundled[:5], "train")
    assert "name no participant" not in capsys.readouterr().out


def test_shuffle_slate_remaps_gold_and_is_deterministic(bundled):
    row = schema.clean_row(next(r for r in bundled if r["n_options"] == 5))
    gold_id = row["slate_items_json"][row["gold_index"] - 1]["id"]
    positions = set()
    for k in range(30):
        shuffled = data.shuffle_slate(row, random.Random(k))
        assert shuffled["slate_items_json"][shuffled["gold_index"] - 1]["id"] == gold_id
        assert sorted(i["id"] for i in shuffled["slate_items_json"]) == sorted(i["id"] for i in row["slate_items_json"])
        assert data.shuffle_slate(row, random.Random(k)) == shuffled
        positions.add(shuffled["gold_index"])
    assert len(positions) >= 4  # the clicked item moves around
    assert "state_text" not in shuffled and row["state_text"]


def test_rank_shares_are_disjoint_and_cover_the_global_batch():
    batch = data.step_prompts(50, 8, step=3, seed=0)
    shares = [data.rank_share(batch, r, 4) for r in range(4)]
    assert sorted(i for s in shares for i in s) == sorted(batch)
    assert len(set(batch)) == 8
    with pytest.raises(ValueError, match="divisible"):
        data.rank_share(batch, 0, 3)


def test_step_prompts_cover_each_epoch_once_and_are_pure():
    n, per_step = 10, 4
    order = [i for step in range(5) for i in data.step_prompts(n, per_step, step, seed=1)]
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    assert data.step_prompts(n, per_step, 3, seed=1) == order[12:16]


def test_cli_prints_render_match(tmp_path, bundled):
    path = tmp_path / "unseen.jsonl"
    rows = copy.deepcopy(bundled[::97])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + "{broken\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "data.py", str(path)], capture_output=True, text=True,
                         cwd=data.DATA_DIR.parent, check=True).stdout
    assert f"render_match: {len(rows)}/{len(rows)}" in out
    assert "malformed_json:line" in out


def test_broken_json_array_file_is_a_clear_error(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[{"slate_items_json": [], ', encoding="utf-8")
    with pytest.raises(data.DataError, match="rows.json: not a JSON array"):
        data.load_raw(str(path))
