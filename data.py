"""Datasets, slate shuffling, participant splits and per-rank batches for GRAIL (prompts.py renders rows).

A row follows the upstream GRAIL schema (see data/README.md; schema.py validates one). `load_examples`
turns any source into validated rows: JSON-string columns are decoded, the gold option is checked
against the slate, and a bad row is skipped and counted by reason, never dropped silently.

    python data.py FILE_OR_ID [...] [--max_history=K]   # validate and summarise a dataset
"""
import hashlib
import json
import random
import re
import statistics
import sys
from collections import Counter
from pathlib import Path

import errors
import prompts
import schema
from errors import UserError, first_line

DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED_FILES = ("gun_control.jsonl", "minimum_wage.jsonl")


class DataError(UserError):
    """A dataset that cannot be used at all."""

    def __init__(self, message):
        super().__init__("data", message)


def clean_rows(raw_rows, split_name="data", log=print):
    """Validate every row: (good rows, Counter of skip reasons). Logs one summary line, and one
    more where rows kept their click but lost an unusable opinion field."""
    good, skipped, dropped, seen = [], Counter(), Counter(), set()
    for raw in raw_rows:
        try:
            row = schema.clean_row(raw, dropped)
        except schema.BadRow as bad:
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
    nameless = sum(row["participant_key"] == schema.NAMELESS_KEY for row in good)
    if nameless:
        log(f"[data] {split_name}: {nameless} rows name no participant (no participant_key, no viewer fields): "
            "they count as one participant, so the participant split keeps them all on one side")
    if not good:
        problem = f"every row is bad ({reasons})" if skipped else "no rows at all"
        raise DataError(f"{split_name}: {problem}; nothing to train or evaluate on")
    return good, skipped


# ---------------------------------------------------------------------------------------------
# Loading


def load_raw(source, log=print):
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
        return {split: _rows_from_files(files, kind, log) for split, files in _files_by_split(paths).items()}
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


def _rows_from_files(paths, kind, log=print):
    """Rows from local files. JSON lines are read here (one bad line is a counted bad row, where
    `datasets` would reject the whole file or force one schema on mixed-type columns)."""
    if kind == "parquet":
        import datasets

        return list(datasets.load_dataset("parquet", data_files=[str(p) for p in paths], split="train"))
    rows = []
    for path in paths:
        text = _decoded(path, log)
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
                rows.append(schema.MALFORMED_LINE)  # counted as 'malformed_json:line' by schema.clean_row
    return rows


def _decoded(path, log):
    """A file's text. utf-8-sig: a byte-order mark (some editors write one) is not part of the first
    row. Bytes that are not UTF-8 become U+FFFD, the rows kept (a garbled title is still a click),
    and are counted on one line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("utf-8-sig", errors="replace")
        bad = text.count("\ufffd") - raw.decode("utf-8-sig", errors="ignore").count("\ufffd")
        log(f"[data] {path}: {bad} invalid UTF-8 sequences read as U+FFFD (the rows kept)")
        return text


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
    splits = load_raw(source, log)
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
