"""One row of the upstream GRAIL schema (data/README.md), validated: JSON-string columns decoded, the
gold option checked against the slate, ids read as text, NaN as missing. A row that cannot be used
is a BadRow naming the reason (data.clean_rows counts them); an unusable optional field costs that
field, counted, not the row."""
import hashlib
import json
import math
from collections import Counter

MAX_OPTIONS = 50  # a larger slate is a broken row, not a recommendation list
OPINION_LABELS = ("increase", "decrease", "no_change")
VIEWER_FIELDS = ("viewer_profile_sentence", "initial_viewpoint", "survey_highlights")  # who the viewer is
TEXT_FIELDS = VIEWER_FIELDS + ("current_video_id", "current_video_title", "current_video_channel", "issue",
                               "participant_study", "participant_key", "next_video_id", "state_text", "id")
ID_FIELDS = ("participant_key", "participant_study", "id", "next_video_id", "current_video_id")


class BadRow(ValueError):
    """A row that cannot be used; `reason` is the counter key."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


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


def _as_int(value):
    """An option number written as 2.0 (parquet and pandas store ints with nulls as floats) or "2"
    (a CSV) as the int 2; anything else as it is."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdecimal() and value.strip().isascii():
        return int(value)
    return value


def _gold_index(row, slate):
    """1-based gold position from `gold_index` and/or `next_video_id`; both must agree when present."""
    index = _as_int(row.get("gold_index"))
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
    value = _as_int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else False


def participant_key(row):
    """The row's participant: `participant_key`, else a hash of the viewer fields (as upstream)."""
    if row.get("participant_key"):
        return row["participant_key"]
    text = "\n".join(row.get(f) or "" for f in VIEWER_FIELDS)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


NAMELESS_KEY = participant_key({})  # no participant_key and no viewer fields: every such row is this one
