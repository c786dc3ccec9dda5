"""Evaluation of a simulator: how much probability the model gives to what held-out people chose.

- Answer mode: the exact choice distribution of every row (choices.py, one forward per row), scored
  by log-loss, Brier, position TVD and valid mass beside uniform and the position prior, overall and
  per issue and study, with a calibration table. The mode of the distribution is the model's answer.
- Think mode: greedy completions give the answers; `eval_samples` sampled answers per row give an
  estimate of the distribution (labelled with K), scored the same way.
- In three views of every row: the `original` slate order; `shuffled` slates (fixed seed, gold
  remapped); `cue_neutral` options (titles only, so neither position nor a missing duration or
  channel identifies the click). Accuracy of the answers beside positional baselines on the same
  rows, and the published checkpoints' recorded answers on the same rows.

Returns dicts; the trainer writes them (outputs.py) and reports.py renders them.
"""
import hashlib
import json
import math
import random
from collections import Counter
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

import choices
import data
import distributed
import opinions
import outputs
import rewards
import rollout
from errors import UserError, first_line

VIEWS = ("original", "shuffled", "cue_neutral")


def rate(numerator, denominator):
    return numerator / denominator if denominator else None


def wilson_interval(successes, n, z=1.959963984540054):
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return [None, None]
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]


def accuracy_ci(correct):
    return {"accuracy": rate(sum(correct), len(correct)), "ci95": wilson_interval(sum(correct), len(correct)),
            "n": len(correct)}


def select_rows(train_rows, val_rows, split, max_rows, seed, needed=True):
    """The rows of `split` (validation | train | all); a seeded sample of `max_rows` of them (0 = all),
    in their order, stratified by (issue, study): each keeps its share, and none is left out while
    max_rows allows one of each. An empty split that is `needed` is a DataError."""
    rows = {"validation": val_rows, "train": train_rows, "all": train_rows + val_rows}[split]
    if not rows and needed:
        raise data.DataError(f"the {split} split is empty ({len(train_rows)} train, {len(val_rows)} validation "
                             "rows): use eval_split=train or all, a larger val_fraction, or more participants")
    if max_rows and max_rows < len(rows):
        groups = [indices for _, indices in choices.grouped(rows, range(len(rows)), choices.issue_and_study)]
        keep = stratified_sample(groups, max_rows, random.Random(f"{seed}:eval"))
        rows = [rows[i] for i in keep]
    return rows


def stratified_sample(groups, k, rng):
    """k of the indices in `groups` (lists), sorted: one from each group first (the largest groups'
    where k is smaller than their number), the rest in proportion to what each group has left
    (largest remainders)."""
    sizes = [len(group) for group in groups]
    quota = [0] * len(groups)
    for j in sorted(range(len(groups)), key=lambda j: -sizes[j])[:k]:
        quota[j] = 1
    left, spare = k - sum(quota), [size - q for size, q in zip(sizes, quota)]
    if left:
        exact = [left * s / sum(spare) for s in spare]
        extra = [int(e) for e in exact]
        for j in sorted(range(len(groups)), key=lambda j: extra[j] - exact[j])[:left - sum(extra)]:
            extra[j] += 1  # the largest fractional parts
        quota = [q + e for q, e in zip(quota, extra)]
    return sorted(i for group, q in zip(groups, quota) for i in rng.sample(group, q))


def view_rows(rows, view, seed):
    if view == "shuffled":
        return [data.shuffle_slate(row, random.Random(f"{seed}:eval-shuffle:{i}")) for i, row in enumerate(rows)]
    if view == "cue_neutral":
        return [data.cue_neutral(row) for row in rows]
    return rows


def cue_rule(row):
    """The formatting cue of the gun-control rows: the clicked item usually lacks a duration."""
    missing = [i for i, item in enumerate(row["slate_items_json"], 1) if item.get("length_seconds") is None]
    return missing[0] if missing else 1


def baseline_predictions(rows, train_rows, with_cue):
    top_train = Counter(row["gold_index"] for row in train_rows).most_common(1)[0][0] if train_rows else 1
    out = {"always_first": [1] * len(rows), "always_last": [row["n_options"] for row in rows],
           f"most_frequent_index_train_{top_train}": [top_train] * len(rows)}
    if with_cue:
        out["cue_no_duration"] = [cue_rule(row) for row in rows]
    return out


def group_accuracy(rows, correct, key):
    groups = {}
    for row, ok in zip(rows, correct):
        groups.setdefault(str(key(row)), []).append(ok)
    return {name: accuracy_ci(values) for name, values in sorted(groups.items())}


def view_metrics(rows, predictions, train_rows, view, formatted=None):
    """Accuracy of one answer per row (None = no valid answer) beside the baselines on the same rows;
    `formatted`: the strict-format flag of each generated completion."""
    correct = [p == row["gold_index"] for p, row in zip(predictions, rows)]
    answers = Counter(p for p in predictions if p is not None)
    top_answer, top_count = answers.most_common(1)[0] if answers else (None, 0)
    baselines = {"random": {"accuracy": rate(sum(1 / row["n_options"] for row in rows), len(rows))}}
    for name, preds in baseline_predictions(rows, train_rows, with_cue=view != "cue_neutral").items():
        baselines[name] = accuracy_ci([p == row["gold_index"] for p, row in zip(preds, rows)])
    return {**accuracy_ci(correct), "parsed_rate": rate(sum(p is not None for p in predictions), len(rows)),
            "format_rate": rate(sum(formatted), len(rows)) if formatted is not None else None,
            "answer_distribution": {str(k): v for k, v in sorted(answers.items())},
            "gold_index_distribution": {str(k): v for k, v in sorted(Counter(r["gold_index"] for r in rows).items())},
            "most_common_answer": top_answer, "most_common_answer_share": rate(top_count, len(rows)),
            "by_issue": group_accuracy(rows, correct, lambda r: r.get("issue")),
            "by_participant_study": group_accuracy(rows, correct, lambda r: r.get("participant_study")),
            "by_n_options": group_accuracy(rows, correct, lambda r: r["n_options"]),
            "baselines": baselines}


def reference_metrics(rows):
    """Accuracy of the published checkpoints' recorded answers on the same rows (original order)."""
    names = sorted({name for row in rows for name in (row.get("reference_predictions") or {})})
    out = {}
    for name in names:
        pairs = [(row["reference_predictions"][name], row["gold_index"]) for row in rows
                 if isinstance(row.get("reference_predictions"), dict) and row["reference_predictions"].get(name) is not None]
        answers = Counter(answer for answer, _ in pairs)
        out[name] = {**accuracy_ci([answer == gold for answer, gold in pairs]),
                     "most_common_answer_share": rate(answers.most_common(1)[0][1], len(pairs)) if pairs else None}
    return out


class Stopped(Exception):
    """A stop was requested during an evaluation (`should_stop` said so on every rank)."""


def rounds(n_rows, per_rank, world, should_stop):
    """Row indices of this rank, `per_rank` at a time, in the same number of rounds on every rank,
    asking `should_stop` (a collective) before each, so that all ranks stop within one batch."""
    chunk = per_rank * world.size
    for lo in range(0, n_rows, chunk):
        if should_stop():
            raise Stopped()
        yield list(range(lo + world.rank, min(lo + chunk, n_rows), world.size))


def progress(n_rows, what, world):
    """Rank 0's bar over every rank's rows (the ranks move in step): rows done, rows/s, time left."""
    return tqdm(total=n_rows, desc=f"eval {what}", unit="row", disable=not world.is_main, dynamic_ncols=True)


def complete_rows(model, tokenizer, rows, prompt, cfg, world, num_samples, greedy, should_stop, what):
    """`num_samples` completions of every row (each rank decodes its share of the rows). Returns, in
    row order, one (texts, truncated flags) pair per row."""
    results = []
    # eval_batch_size counts prompts: with the shared prefix a prompt's samples cost one prefill.
    with progress(len(rows), what, world) as bar:
        for idx in rounds(len(rows), cfg.eval_batch_size, world, should_stop):
            if idx:
                out = rollout.generate(model, tokenizer, [prompt.text(tokenizer, rows[i]) for i in idx], num_samples,
                                       cfg.max_completion_length, temperature=1.0, greedy=greedy,
                                       shared_prefix=cfg.shared_prefix)
                truncated = out.truncated.tolist()
                for j, i in enumerate(idx):
                    span = slice(j * num_samples, (j + 1) * num_samples)
                    results.append((i, out.texts[span], truncated[span]))
            bar.update(min(cfg.eval_batch_size * world.size, len(rows) - bar.n))
    return [(texts, truncated) for _, texts, truncated in sorted(distributed.all_gather_list(results))]


class DistributionCache:
    """The exact distributions of a model as saved on disk, kept across runs in `folder`: an
    evaluation of the same files with the same code, on a row with the same prompt, reads them
    instead of recomputing them (the untrained model's step-0 evaluation of every default job).
    Keyed by the sha256 of every file of the model folder, of the code that computes a distribution
    and its library versions, attention and precision, and per row of the prompt text, slate size and
    click. Only for a model as its files are: never one that trained in memory. Rank 0 hashes the
    files (gigabytes on a cluster model) and every rank reads its key from there: a collective."""

    # The code an exact distribution runs (tested by tracing it) and data.py (the order of its opinion
    # labels): a change to any of it is another cache.
    CACHE_SOURCES = ("checkpoint.py", "choices.py", "data.py", "distributed.py", "evaluate.py", "grpo.py", "prompts.py",
                     "rollout.py")

    def __init__(self, model_dir, model, precision, folder, world):
        key = self._key(model_dir, model, precision) if world.is_main else None
        self.path = Path(folder) / f"{distributed.all_gather_list([key])[0]}.json"
        self.entries = self._read()

    @staticmethod
    def _key(model_dir, model, precision):
        digest = hashlib.sha256()
        for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(model_dir)).encode())
            with open(path, "rb") as f:
                while chunk := f.read(1 << 24):
                    digest.update(chunk)
        for source in DistributionCache.CACHE_SOURCES:
            digest.update((Path(__file__).parent / source).read_bytes())
        device = next(model.parameters()).device.type
        digest.update(f"{torch.__version__} {transformers.__version__} {model.config._attn_implementation} "
                      f"{device} {precision}".encode())
        return digest.hexdigest()[:32]

    def _read(self):
        try:
            return json.loads(self.path.read_text(encoding="utf-8")) if self.path.exists() else {}
        except (OSError, ValueError) as err:  # a broken cache file is recomputed, never trusted
            print(f"[eval] cache {self.path} unreadable ({type(err).__name__}): computing every row", flush=True)
            return {}

    @staticmethod
    def row_key(text, row):
        return hashlib.sha256(f"{row['n_options']}:{row['gold_index']}:{text}".encode()).hexdigest()

    def save(self, new_entries):
        """Adds `new_entries` (rank 0) to what the file holds now; a failed write costs only the reuse."""
        if not new_entries:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            merged = {**self._read(), **new_entries}
            outputs.write_text(self.path, json.dumps(merged))
            self.entries = merged
        except (OSError, UserError) as err:
            print(f"[eval] cache not written ({first_line(err)}): the next run computes these rows again", flush=True)


def exact_distributions(model, tokenizer, rows, prompt, world, batch_size, should_stop, what="exact", cache=None):
    """Per row, (p(k) over its options, p(direction | the human's click) over OPINION_LABELS) in
    answer mode, each rank scoring its share of the rows, one forward a row (none for a row `cache`
    holds); `should_stop` is asked every `batch_size` rows."""
    stop_ids = rollout.stop_token_ids(model, tokenizer)
    mine = []
    with progress(len(rows), what, world) as bar:
        for idx in rounds(len(rows), batch_size, world, should_stop):
            for i in idx:
                text = prompt.text(tokenizer, rows[i])
                key = cache.row_key(text, rows[i]) if cache else None
                if key and key in cache.entries:
                    mine.append((i, key, *cache.entries[key]))
                else:
                    click, opinion = choices.answer_logprobs(model, tokenizer, text, rows[i]["n_options"], stop_ids,
                                                             gold=rows[i]["gold_index"])
                    mine.append((i, key, click.exp().tolist(), opinion.exp().tolist()))
                bar.update(min(world.size, len(rows) - bar.n))
    gathered = sorted(distributed.all_gather_list(mine))
    if cache and world.is_main:
        cache.save({key: [click, opinion] for _, key, click, opinion in gathered if key not in cache.entries})
    return [(click, opinion) for _, _, click, opinion in gathered]


def never():
    return False


def evaluate(model, tokenizer, rows, train_rows, prompt, cfg, world, should_stop=never, cache=None):
    """Every view's answers beside their baselines, the choice distribution's scores (exact in answer
    mode; from `eval_samples` samples in think mode, original view), and the published checkpoints on
    the same rows. Reads from cfg: eval_views, split_seed, eval_samples, eval_batch_size,
    max_completion_length, shared_prefix, bf16, cpu_bf16. Raises Stopped within one batch of `should_stop()`
    turning true (a collective: every rank calls it as often). `cache`: a DistributionCache of the
    model's files, for a model that has not changed since it was loaded.

    Returns (metrics, predictions): the same metrics on every rank, and one prediction per row of the
    original view (its answer, and its distribution or completion)."""
    model.eval()
    metrics, predictions = {"views": {}}, []
    with distributed.full_params(model), distributed.autocast(world.device, cfg.bf16, cfg.cpu_bf16):
        for view in cfg.eval_views:
            shown = view_rows(rows, view, cfg.split_seed)
            if prompt.answer_only:
                view_metrics_, shown_predictions = exact_view(model, tokenizer, shown, train_rows, prompt, cfg, world,
                                                              view, should_stop, cache)
            else:
                view_metrics_, shown_predictions = sampled_view(model, tokenizer, shown, train_rows, prompt, cfg,
                                                                world, view, should_stop)
            metrics["views"][view] = view_metrics_
            if view == "original":
                predictions = shown_predictions
    metrics["reference_checkpoints"] = reference_metrics(rows)
    # The baselines are fit on train_rows: on a row of one of its participants they saw the answer.
    fit_on = {row["participant_key"] for row in train_rows}
    metrics["baselines_in_sample_rows"] = sum(row["participant_key"] in fit_on for row in rows)
    first = metrics["views"].get("original") or next(iter(metrics["views"].values()))
    metrics.update(upstream_keys(first, len(rows)))
    if "choice" in first:
        metrics.update(headline_keys(first["choice"]))
    metrics.update(opinions.headline_keys(first.get("opinion")))
    return metrics, predictions


def exact_view(model, tokenizer, rows, train_rows, prompt, cfg, world, view, should_stop, cache):
    pairs = exact_distributions(model, tokenizer, rows, prompt, world, cfg.eval_batch_size, should_stop,
                                f"{view}, exact", cache)
    distributions, opinion_dists = [click for click, _ in pairs], [opinion for _, opinion in pairs]
    answers = [choices.mode(p) for p in distributions]
    out = view_metrics(rows, answers, train_rows, view)
    out["choice"] = {**choices.choice_metrics(rows, distributions, train_rows), "method": "exact"}
    out["opinion"] = opinions.opinion_metrics(rows, opinion_dists, train_rows, "exact")
    return out, [{"id": row.get("id"), "gold": row["gold_index"], "prediction": answer,
                  "distribution": [round(x, 6) for x in p], "opinion": row.get("opinion_direction"),
                  "opinion_distribution": [round(x, 6) for x in o]}
                 for row, answer, p, o in zip(rows, answers, distributions, opinion_dists)]


def sampled_view(model, tokenizer, rows, train_rows, prompt, cfg, world, view, should_stop):
    outputs = complete_rows(model, tokenizer, rows, prompt, cfg, world, 1, greedy=True, should_stop=should_stop,
                            what=f"{view}, greedy")
    parsed = [rewards.parse(texts[0], truncated[0], row, answer_only=False) for (texts, truncated), row in zip(outputs, rows)]
    answers = [p.choice for p in parsed]
    out = view_metrics(rows, answers, train_rows, view, [p.formatted for p in parsed])
    labelled = [(row, p.opinion) for row, p in zip(rows, parsed) if row.get("opinion_direction")]
    if labelled and view == "original":
        out["opinion_accuracy"] = accuracy_ci([opinion == row["opinion_direction"] for row, opinion in labelled])
    if cfg.eval_samples and view == "original":
        sampled = complete_rows(model, tokenizer, rows, prompt, cfg, world, cfg.eval_samples, greedy=False,
                                should_stop=should_stop, what=f"{view}, {cfg.eval_samples} samples")
        parsed = [[rewards.parse(text, cut, row, answer_only=False) for text, cut in zip(texts, truncated_flags)]
                  for (texts, truncated_flags), row in zip(sampled, rows)]
        distributions = [choices.sampled_distribution([p.choice for p in ps], row["n_options"])
                         for ps, row in zip(parsed, rows)]
        # The valid mass is the share of samples that parse: the smoothed estimate's own is mostly its
        # smoothing where K is small and the slate large (12 options, 3 unparseable samples: 0.63).
        def parsing(field):
            return [sum(getattr(p, field) is not None for p in ps) / len(ps) for ps in parsed]

        out["choice"] = {**choices.choice_metrics(rows, distributions, train_rows, parsing("choice")),
                         "method": "sampled", "samples_per_row": cfg.eval_samples}
        # Sampled after the model's own click, not the human's: the marginal over its clicks.
        opinion = opinions.opinion_metrics(rows, [opinions.sampled_distribution([p.opinion for p in ps])
                                                  for ps in parsed], train_rows, "sampled", parsing("opinion"))
        out["opinion"] = opinion and {**opinion, "samples_per_row": cfg.eval_samples}
    return out, [{"id": row.get("id"), "gold": row["gold_index"], "prediction": answer, "completion": texts[0]}
                 for row, answer, (texts, _) in zip(rows, answers, outputs)]


def untrained_scores(metrics):
    """The scores of the model before training (a step-0 evaluation's original view), to stand beside
    every later evaluation; None when that evaluation has no choice distribution."""
    choice = (metrics.get("views", {}).get("original") or {}).get("choice")
    if not choice:
        return None
    opinion = metrics["views"]["original"].get("opinion")

    def models(groups):
        return {name: group["model"] for name, group in groups.items()}

    return {"step": metrics.get("step"), "rows": [metrics.get("split"), metrics.get("n_total")],
            "model": choice["model"], "by_group": models(choice["by_group"]),
            "opinion": opinion and {"model": opinion["model"], "by_group": models(opinion["by_group"]),
                                    "by_issue": models(opinion["by_issue"])}}


def set_beside(metrics, untrained, log=print):
    """Step 0's untrained scores beside `metrics`, when they were computed on the same rows (a resumed
    run may change eval_split or eval_max_rows); otherwise say why they are missing."""
    rows = [metrics.get("split"), metrics.get("n_total")]
    if untrained.get("rows", rows) == rows:
        metrics["untrained"] = untrained
    else:
        log(f"[eval] the untrained model was scored on other rows ({untrained['rows']}, now {rows}): "
            "its scores are not set beside these")


def headline_keys(choice):
    """The simulator's scores at the top level of eval.json (original view)."""
    model = choice["model"]
    return {"choice_logloss": model["logloss"], "choice_logloss_renorm": model["logloss_renorm"],
            "choice_brier": model["brier"], "choice_tvd": model["tvd"], "choice_valid_mass": model["valid_mass"],
            "prior_logloss": choice["prior"]["logloss"], "uniform_logloss": choice["uniform"]["logloss"],
            "choice_method": choice["method"]}


def upstream_keys(view, n):
    """The key names of upstream's metrics.json, so their tooling reads eval.json."""
    top = next(name for name in view["baselines"] if name.startswith("most_frequent_index"))
    return {"n_total": n, "accuracy_overall": view["accuracy"], "parsed_rate": view["parsed_rate"],
            "format_rate": view["format_rate"], "by_n_options": view["by_n_options"],
            "group_metrics": {"by_participant_study": view["by_participant_study"], "by_issue": view["by_issue"]},
            "gold_index_distribution": view["gold_index_distribution"],
            "baseline_most_frequent_gold_index": {"top_index": int(top.rsplit("_", 1)[1]), "fit_on": "train split",
                                                  **view["baselines"][top]},
            "random_baseline_expected_accuracy": view["baselines"]["random"]["accuracy"]}
