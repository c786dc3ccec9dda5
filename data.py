"""Datasets, slate shuffling, participant splits and per-rank batches for GRAIL (prompts.py renders rows).

A row follows the upstream GRAIL schema (see data/README.md). `load_examples` turns any source into
validated rows: JSON-string columns are decoded, the gold option is checked against the slate, and a
bad row is skipped and counted by reason, never dropped silently.

    python data.py FILE_OR_ID [...] [--max_history=K]   # validate and summarise a dataset
"""
import hashlib
import json
import math
import random
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

import errors
import prompts
from errors import UserError, first_line

DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED_FILES = ("gun_control.jsonl", "minimum_wage.jsonl")
MAX_OPTIONS = 50  # a larger slate is a broken row, not a recommendation list
OPINION_LABELS = ("increase", "decrease", "no_change")
VIEWER_FIELDS = ("viewer_profile_sentence", "initial_viewpoint", "survey_highlights")  # who the viewer is
TEXT_FIELDS = VIEWER_FIELDS + ("current_video_id", "current_video_title", "current_video_channel", "issue",
                               "participant_study", "participant_key", "next_video_id", "state_text", "id")
ID_FIELDS = ("participant_key", "participant_study", "id", "next_video_id", "current_video_id")


class DataError(UserError):
    """A dataset that cannot be used at all."""

    def __init__(self, message):
        super().__init__("data", message)


class BadRow(ValueError):
    """A row that cannot be used; `reason` is the counter key."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# Validation


def _decode_list(row, field, required):
    value = row.get(field)
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else None  # '' and 'null' are "none"
        except ValueError:
            raise BadRow(f"malformed_json:{field}") from None
    if value is None:
        if required:
            raise BadRow(f"missing_field:{field}")
        return []
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise BadRow(f"wrong_type:{field}")
    items = [_nan_as_none(item) for item in value]
    return [{**item, "id": _as_key(item["id"])} if "id" in item else item for item in items]


def _nan_as_none(mapping):
    """NaN is how pandas and parquet write a missing value: read it as None."""
    return {key: None if isinstance(value, float) and math.isnan(value) else value for key, value in mapping.items()}


def _clean_item(item, field, text_keys, number_keys, needs_label, dropped):
    """A slate or history item with its counts read as numbers. A count that is not one (a word, a
    boolean, an int too large for a float) is only displayed: it is removed and counted, the row kept."""
    for key in text_keys:
        if item.get(key) is not None and not isinstance(item[key], str):
            raise BadRow(f"wrong_type:{field}.{key}")
    if needs_label and not (item.get("title") or item.get("id")):
        raise BadRow(f"missing_field:{field}.title")  # an option must be nameable
    out = dict(item)
    for key in number_keys:
        value, problem = _read_number(item.get(key))
        if problem:
            del out[key]
            dropped[f"{field}.{key}:{problem}"] += 1
        elif key in out:
            out[key] = value
    return out


def _read_number(value):
    """(a finite number or None, why it was unreadable or None): a numeric string is read ("12", a
    CSV's), '' is no value."""
    if isinstance(value, str):
        if not value.strip():
            return None, None
        try:
            number = float(value)
        except ValueError:
            return None, "not_a_number"
        value = int(number) if number.is_integer() and abs(number) < 2 ** 53 else number
    if value is None:
        return None, None
    return (value, None) if _is_number(value) else (None, "not_a_number")


def _is_number(value):
    """A finite int or float. bool is an int subclass in Python, and a boolean count is not a count;
    an int too large for a float is not finite here (math.isfinite raises on it, rendering would)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _as_key(value):
    """An id written as a number (pandas, a CSV round trip; 1234.0 where the column has nulls) as
    the text it stands for; anything else as it is."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _gold_index(row, slate):
    """1-based gold position from `gold_index` and/or `next_video_id`; both must agree when present."""
    index = row.get("gold_index")
    if isinstance(index, float) and index.is_integer():  # parquet/pandas store ints with nulls as floats
        index = int(index)
    if isinstance(index, str) and index.strip().isdecimal() and index.strip().isascii():  # a CSV-born "2"
        index = int(index)
    if index is not None:
        if isinstance(index, bool) or not isinstance(index, int):
            raise BadRow("wrong_type:gold_index")
        if not 1 <= index <= len(slate):
            raise BadRow("gold_index_out_of_range")
    gold_id = row.get("next_video_id")
    if gold_id is None or gold_id == "":  # '' is "none" here as in every other field
        if index is None:
            raise BadRow("missing_field:next_video_id")
        return index
    matches = [i + 1 for i, item in enumerate(slate) if item.get("id") == gold_id]
    if not matches:
        raise BadRow("gold_not_in_slate")
    if index is None:
        if len(matches) > 1:
            raise BadRow("gold_ambiguous")
        return matches[0]
    if index not in matches:
        raise BadRow("gold_mismatch")
    return index


MALFORMED_LINE = {"__malformed_json_line__": True}


def clean_row(row, dropped=None):
    """Validated copy of a raw row: lists decoded, `gold_index` set, `participant_key` filled in.
    An unusable optional field (`opinion_direction`, `opinion_before`, an item's count, a published
    checkpoint's answer) is removed, not the row (its click is still good), and counted in `dropped`
    by reason. NaN, pandas' missing value, is None."""
    if row is MALFORMED_LINE:
        raise BadRow("malformed_json:line")
    if not isinstance(row, dict):
        raise BadRow("wrong_type:row")
    dropped = Counter() if dropped is None else dropped
    row = _nan_as_none(row)
    row = {**row, **{field: _as_key(row[field]) for field in ID_FIELDS if field in row}}
    for field in TEXT_FIELDS:
        if row.get(field) is not None and not isinstance(row[field], str):
            raise BadRow(f"wrong_type:{field}")
    slate = _decode_list(row, "slate_items_json", required=True)
    history = _decode_list(row, "watched_detailed_json", required=False)
    if not slate:
        raise BadRow("empty_slate")
    if len(slate) > MAX_OPTIONS:
        raise BadRow("slate_too_large")
    slate = [_clean_item(item, "slate_items_json", ("id", "title", "channel_title"),
                         ("length_seconds", "view_count", "like_count", "comment_count"), True, dropped)
             for item in slate]
    history = [_clean_item(item, "watched_detailed_json", ("id", "title", "channel"),
                           ("watch_seconds", "total_length", "watch_percent"), False, dropped) for item in history]
    gold = _gold_index(row, slate)
    out = dict(row)
    for field, (value, problem) in (("opinion_direction", _opinion_direction(row)),
                                    ("opinion_before", _opinion_before(row))):
        out[field] = value
        if problem:
            dropped[f"{field}:{problem}"] += 1
    references, unreadable = _reference_predictions(row.get("reference_predictions"))
    if unreadable:
        dropped["reference_predictions:unreadable"] += unreadable
    out.update(slate_items_json=slate, watched_detailed_json=history, gold_index=gold,
               n_options=len(slate), participant_key=participant_key(row), reference_predictions=references)
    if not out.get("id"):  # optional; without one a prediction could not be matched to its row
        out["id"] = hashlib.sha1(json.dumps(row, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:16]
    return out


def _opinion_direction(row):
    """(label or None, why it was dropped or None): case and spaces ignored ("No change" is
    no_change); '' is no label."""
    value = row.get("opinion_direction")
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, None
    label = "_".join(value.lower().replace("-", " ").split()) if isinstance(value, str) else None
    return (label, None) if label in OPINION_LABELS else (None, "unknown")


def _opinion_before(row):
    """(the pre-study index in [0, 1] or None, why it was dropped or None); a numeric string is read."""
    value, problem = _read_number(row.get("opinion_before"))
    if value is None:
        return None, problem
    return (value, None) if 0 <= value <= 1 else (None, "outside_0_1")


def _reference_predictions(value):
    """(the published checkpoints' answers {name: option or None}, how many answers were unreadable).
    Optional, so what cannot be read is dropped and counted, not the row; an option written as 2.0
    or "2" (pandas, a CSV) is read as 2."""
    if value is None or value == "":
        return {}, 0
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}, 1
    if not isinstance(value, dict):
        return {}, 1
    answers = {str(k): _option_number(v) for k, v in value.items()}
    kept = {k: v for k, v in answers.items() if v is not False}
    return kept, len(answers) - len(kept)


def _option_number(value):
    """An answer as an int, None for "no answer", False where it is not one."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, str) and value.strip().isdecimal() and value.strip().isascii():
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else False


def participant_key(row):
    """The row's participant: `participant_key`, else a hash of the viewer fields (as upstream)."""
    if row.get("participant_key"):
        return row["participant_key"]
    text = "\n".join(row.get(f) or "" for f in VIEWER_FIELDS)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


NAMELESS_KEY = participant_key({})  # no participant_key and no viewer fields: every such row is this one


def clean_rows(raw_rows, split_name="data", log=print):
    """Validate every row: (good rows, Counter of skip reasons). Logs one summary line, and one
    more where rows kept their click but lost an unusable opinion field."""
    good, skipped, dropped, seen = [], Counter(), Counter(), set()
    for raw in raw_rows:
        try:
            row = clean_row(raw, dropped)
        except BadRow as bad:
            skipped[bad.reason] += 1
            continue
        # The same row twice (a file given twice, a concatenation) would train and score it twice.
        fingerprint = hashlib.sha1(json.dumps(raw, sort_keys=True, default=str).encode("utf-8")).digest()
        if fingerprint in seen:
            skipped["duplicate_row"] += 1
            continue
        seen.add(fingerprint)
        good.append(row)
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items())) or "none"
    log(f"[data] {split_name}: {len(good)} rows kept, {sum(skipped.values())} skipped ({reasons})")
    if dropped:
        fields = ", ".join(f"{k}={v}" for k, v in sorted(dropped.items()))
        log(f"[data] {split_name}: unreadable fields dropped, the rows kept ({fields})")
    nameless = sum(row["participant_key"] == NAMELESS_KEY for row in good)
    if nameless:
        log(f"[data] {split_name}: {nameless} rows name no participant (no participant_key, no viewer fields): "
            "they count as one participant, so the participant split keeps them all on one side")
    if not good:
        problem = f"every row is bad ({reasons})" if skipped else "no rows at all"
        raise DataError(f"{split_name}: {problem}; nothing to train or evaluate on")
    return good, skipped


# ---------------------------------------------------------------------------------------------
# Loading


def load_raw(source):
    """Raw rows per split from a hub id, a `save_to_disk` folder, a folder of files, or files.

    `source` may be a list or a comma-separated string of files; '' means the bundled data.
    Returns {split_name: list of dicts}.
    """
    import datasets  # heavy import: only where a source is actually read

    if not source:
        source = [str(DATA_DIR / name) for name in BUNDLED_FILES]
    if isinstance(source, str):  # "a.jsonl,b.jsonl", "a.jsonl, b.jsonl" or "[a.jsonl, b.jsonl]"
        inner = source.strip()
        inner = inner[1:-1] if inner.startswith("[") and inner.endswith("]") else inner
        source = [part.strip().strip("'\"") for part in inner.split(",") if part.strip().strip("'\"")]
    paths = [Path(p) for p in source]
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        if (folder / "dataset_dict.json").exists() or (folder / "dataset_info.json").exists():
            loaded = datasets.load_from_disk(str(folder))
            return _as_splits(loaded)
        paths = sorted(p for p in folder.iterdir() if p.suffix in (".jsonl", ".json", ".parquet"))
        if not paths:
            raise DataError(f"{folder}: no .jsonl/.json/.parquet files and not a save_to_disk folder")
    if all(p.exists() for p in paths):
        kinds = {"parquet" if p.suffix == ".parquet" else "json" for p in paths}
        if len(kinds) > 1:
            raise DataError(f"mixed file types in {source}: use one of .jsonl/.json or .parquet")
        kind = kinds.pop()
        return {split: _rows_from_files(files, kind) for split, files in _files_by_split(paths).items()}
    missing = [str(p) for p in paths if not p.exists()]
    if len(paths) > 1 or any(p.suffix in (".jsonl", ".json", ".parquet") for p in paths):
        raise DataError(f"data files not found: {missing}")
    try:
        return _as_splits(datasets.load_dataset(str(paths[0])))  # a hub dataset id
    except (OSError, ValueError, ConnectionError) as err:  # offline, no such dataset, a bad folder
        raise DataError(f"{paths[0]}: no such file or folder, and not a loadable hub dataset ({first_line(err)})") \
            from err


def _files_by_split(paths):
    """{split: files}: files named after a split (train.jsonl, validation.jsonl, dev.json,
    test-00000-of-00001.parquet, ...) are that split, as the hub's data files are; files named
    otherwise are one split, "train"."""
    named = {p: split_name(p.stem) for p in paths}
    if not any(named.values()):
        return {"train": paths}
    if not all(named.values()):
        raise DataError(f"some files are named after a split ({', '.join(p.name for p in paths if named[p])}) and "
                        f"some not ({', '.join(p.name for p in paths if not named[p])}): name each file after its "
                        f"split (train, validation, test, ...) or none")
    splits = {}
    for path in paths:
        splits.setdefault(named[path], []).append(path)
    return splits


SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "eval": "eval", "test": "test"}


def split_name(name):
    """The split a file or dataset split name stands for ("dev" and "valid" are validation,
    "train-00000-of-00002" is train), or None."""
    match = re.fullmatch(r"([a-z]+)(?:[-_.].*)?", name.lower())
    return SPLIT_ALIASES.get(match.group(1)) if match else None


def _rows_from_files(paths, kind):
    """Rows from local files. JSON lines are read here (one bad line is a counted bad row, where
    `datasets` would reject the whole file or force one schema on mixed-type columns)."""
    if kind == "parquet":
        import datasets

        return list(datasets.load_dataset("parquet", data_files=[str(p) for p in paths], split="train"))
    rows = []
    for path in paths:
        # utf-8-sig: a byte-order mark (some editors write one) is not part of the first row.
        text = path.read_text(encoding="utf-8-sig", errors="replace")
        if path.suffix == ".json" and text.lstrip().startswith("["):
            try:
                rows.extend(json.loads(text))
            except ValueError as err:  # one broken array loses every row: say which file
                raise DataError(f"{path}: not a JSON array of rows ({err})") from None
            continue
        if path.suffix == ".json" and text.lstrip().startswith("{") and "\n" in text.strip():
            try:  # one row written over several lines (pretty-printed), not JSON lines
                rows.append(json.loads(text))
                continue
            except ValueError:
                pass  # JSON lines after all: each line is read (and counted) below
        # Only "\n" ends a JSON line: splitlines() would also split at U+2028, U+0085, ... which
        # json.dumps(ensure_ascii=False) leaves unescaped inside strings.
        for line in text.split("\n"):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                rows.append(MALFORMED_LINE)  # counted as 'malformed_json:line' by clean_row
    return rows


def _as_splits(loaded):
    import datasets

    if isinstance(loaded, datasets.DatasetDict):
        splits = {}
        for name, split in loaded.items():
            splits.setdefault(split_name(name) or name, []).extend(split)
        return splits
    return {"train": list(loaded)}


VALIDATION_SPLIT_NAMES = ("validation", "eval", "test")


def load_examples(source, val_fraction, seed, log=print):
    """(train rows, validation rows) of a source, validated.

    A source that ships a held-out split keeps it: the first of validation, eval, test is evaluated,
    and only `train` (or, without one, every split that is not held out) is trained on; another held-out
    split (a test set beside a validation set) is set aside, never trained on. A source with no train
    rows gives [] for them (enough for --eval_only). Otherwise the rows are split by participant.
    """
    splits = load_raw(source)
    val_name = next((name for name in VALIDATION_SPLIT_NAMES if name in splits), None)
    train_names = ["train"] if "train" in splits else [n for n in splits if n not in VALIDATION_SPLIT_NAMES]
    for name in sorted(splits.keys() - {val_name, *train_names}):
        why = f"a held-out split; {val_name} is evaluated" if name in VALIDATION_SPLIT_NAMES else "not the train split"
        log(f"[data] {name}: {len(splits[name])} rows set aside ({why})")
    train = [row for name in train_names for row in splits[name]]
    if val_name is not None:
        train_rows = clean_rows(train, "train", log)[0] if train else []
        val_rows, _ = clean_rows(splits[val_name], val_name, log)
        shared = {row["participant_key"] for row in train_rows} & {row["participant_key"] for row in val_rows}
        if shared:
            log(f"[data] {len(shared)} participants are in both train and {val_name} ("
                f"{sum(row['participant_key'] in shared for row in val_rows)} {val_name} rows): the shipped split "
                "is not by participant, so those rows are not held-out people")
        return train_rows, val_rows
    rows, _ = clean_rows(train, "all", log)
    train_rows, val_rows = split_by_participant(rows, val_fraction, seed)
    log(f"[data] participant split (seed {seed}): train {len(train_rows)} rows, "
          f"validation {len(val_rows)} rows")
    return train_rows, val_rows


def split_by_participant(rows, val_fraction, seed):
    """Hold out about `val_fraction` of the participants of each (issue, study), at least one of
    every stratum with two or more (so that no issue or study goes unscored); no participant on both
    sides. The shuffle depends only on the seed and the participant keys, not on row order."""
    strata = {}
    for row in rows:
        stratum = (row.get("issue") or "", row.get("participant_study") or "")
        strata.setdefault(stratum, set()).add(row["participant_key"])
    held_out = set()
    for stratum in sorted(strata):
        keys = sorted(strata[stratum])
        random.Random(f"{seed}:{stratum}").shuffle(keys)
        count = round(len(keys) * val_fraction)
        held_out.update(keys[: max(count, 1) if val_fraction > 0 and len(keys) > 1 else count])
    train = [row for row in rows if row["participant_key"] not in held_out]
    val = [row for row in rows if row["participant_key"] in held_out]
    return train, val


# ---------------------------------------------------------------------------------------------
# Prompts



def shuffled_order(row, rng):
    """A random display order of `row`'s slate (the original indices, as shown) and the displayed
    position (1-based) its click lands on."""
    order = list(range(len(row["slate_items_json"])))
    rng.shuffle(order)
    return order, order.index(row["gold_index"] - 1) + 1


def shuffle_slate(row, rng):
    """A copy of `row` with its options permuted by `rng` and `gold_index` remapped to follow the
    clicked item, so a policy cannot score by answering a fixed position."""
    order, gold = shuffled_order(row, rng)
    out = dict(row)
    out["slate_items_json"] = [row["slate_items_json"][i] for i in order]
    out["gold_index"] = gold
    out.pop("state_text", None)  # the original prompt no longer describes this slate
    return out


def training_row(row, index, step, seed, shuffle):
    """Training row `index` as the policy sees it at `step`: with `shuffle`, its slate permuted by an
    RNG seeded with (seed, step, index), so a resumed run and every rank agree on it."""
    if not shuffle:
        return row
    return shuffle_slate(row, random.Random(f"{seed}:shuffle:{step}:{index}"))


def cue_neutral(row):
    """A copy of `row` whose options show their titles only. Position aside, the bundled gun-control
    slates give the click away by formatting (the clicked item usually has no duration, often no
    channel or counts); with every option rendered from the same field, only the content is left."""
    out = dict(row)
    out["slate_items_json"] = [{"id": item.get("id"), "title": item.get("title") or item.get("id")}
                               for item in row["slate_items_json"]]
    out.pop("state_text", None)
    return out


# ---------------------------------------------------------------------------------------------
# Batches


def step_prompts(n_rows, prompts_per_step, step, seed):
    """Row indices of the global batch of `step`: epochs are seeded permutations laid end to end,
    so the batch is a pure function of (seed, step) and a resumed run sees the same data."""
    out = []
    position = step * prompts_per_step
    while len(out) < prompts_per_step:
        epoch, offset = divmod(position, n_rows)
        order = list(range(n_rows))
        random.Random(f"{seed}:epoch{epoch}").shuffle(order)
        take = min(prompts_per_step - len(out), n_rows - offset)
        out += order[offset:offset + take]
        position += take
    return out


def rank_share(global_batch, rank, world_size):
    """This rank's disjoint share of a global batch of prompts (its G samples stay with it)."""
    if len(global_batch) % world_size:
        raise ValueError(f"prompts_per_step={len(global_batch)} must be divisible by the "
                         f"world size {world_size}")
    return global_batch[rank::world_size]


def rank_step_prompts(n_rows, prompts_per_step, step, seed, world):
    """This rank's share of the row indices of `step` (step_prompts, then rank_share)."""
    return rank_share(step_prompts(n_rows, prompts_per_step, step, seed), world.rank, world.size)


# ---------------------------------------------------------------------------------------------
# CLI


def _summarise(name, raw, max_history):
    rows, skipped = clean_rows(raw, name)
    groups = Counter((row.get("issue"), row.get("participant_study")) for row in rows)
    for (issue, study), count in sorted(groups.items(), key=str):
        print(f"  {issue} / {study}: {count} rows")
    print(f"  skipped by reason: {dict(sorted(skipped.items())) or 'none'}")
    lengths = [len(prompts.render_user_prompt(row, max_history)) for row in rows]
    print(f"  user prompt chars: min {min(lengths)}, median {int(statistics.median(lengths))}, "
          f"max {max(lengths)}")
    with_text = [row for row in rows if row.get("state_text")]
    if with_text:
        matches = sum(prompts.render_user_prompt(row, max_history) == row["state_text"] for row in with_text)
        print(f"render_match: {matches}/{len(with_text)}")


def main(argv):
    max_history = None
    sources = []
    for arg in argv:
        if arg.startswith("--max_history="):
            max_history = int(arg.split("=", 1)[1])
        elif arg.startswith("--"):
            raise SystemExit(f"unknown option {arg}; usage: python data.py FILE_OR_ID [...] [--max_history=K]")
        else:
            sources.append(arg)
    for name, raw in load_raw(sources).items():
        _summarise(name, raw, max_history)


if __name__ == "__main__":
    errors.run(main, sys.argv[1:])
