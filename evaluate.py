"""Evaluation: greedy accuracy in three views of every row, each beside positional baselines on the
same rows, the published checkpoints on the same rows, and simulation quality from sampled answers.
Returns dicts; the trainer writes them (outputs.py) and reports.py renders them.

Views: the `original` slate order; `shuffled` slates (fixed seed, gold remapped); `cue_neutral`
options (titles only, so neither position nor a missing duration or channel identifies the click).
"""
import math
import random
import statistics
from collections import Counter

import data
import distributed
import rewards
import rollout

VIEWS = ("original", "shuffled", "cue_neutral")
SMOOTHING = 0.5  # additive pseudo-count for the log-loss of sampled choice frequencies


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
    top_train = Counter(row["gold_index"] for row in train_rows).most_common(1)[0][0]
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


def view_metrics(rows, predictions, formatted, train_rows, view):
    correct = [p == row["gold_index"] for p, row in zip(predictions, rows)]
    answers = Counter(p for p in predictions if p is not None)
    top_answer, top_count = answers.most_common(1)[0] if answers else (None, 0)
    baselines = {"random": {"accuracy": rate(sum(1 / row["n_options"] for row in rows), len(rows))}}
    for name, preds in baseline_predictions(rows, train_rows, with_cue=view != "cue_neutral").items():
        baselines[name] = accuracy_ci([p == row["gold_index"] for p, row in zip(preds, rows)])
    return {**accuracy_ci(correct), "parsed_rate": rate(sum(p is not None for p in predictions), len(rows)),
            "format_rate": rate(sum(formatted), len(rows)),
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


def brier_score(probabilities, gold):
    """Multi-class Brier score of one row's choice distribution (a list over options 1..n)."""
    return sum((p - (k == gold)) ** 2 for k, p in enumerate(probabilities, 1))


def simulation_metrics(rows, sampled, train_rows, collapse_margin=0.25):
    """Does the model reproduce the distribution of human choices? `sampled[i]` holds K sampled
    answers (None = unparseable) for rows[i]. Compared with the marginal prior: the position
    frequencies of the training split, the baseline a simulator must beat."""
    K = len(sampled[0])
    n_max = max(row["n_options"] for row in rows)
    human = Counter(row["gold_index"] for row in rows)
    model = Counter(a for answers in sampled for a in answers)  # None counts as its own bucket
    total = K * len(rows)
    human_hist = {str(k): human[k] / len(rows) for k in range(1, n_max + 1)}
    model_hist = {str(k): model[k] / total for k in range(1, n_max + 1)}
    model_hist["invalid"] = model[None] / total
    tvd = 0.5 * (sum(abs(model_hist[k] - human_hist[k]) for k in human_hist) + model_hist["invalid"])
    prior_counts = Counter(row["gold_index"] for row in train_rows)
    scores, prior_scores = [], []
    for row, answers in zip(rows, sampled):
        n = row["n_options"]
        counts = Counter(answers)
        gold = row["gold_index"]
        scores.append((brier_score([counts[k] / K for k in range(1, n + 1)], gold),
                       -math.log((counts[gold] + SMOOTHING) / (K + SMOOTHING * n))))
        prior = [prior_counts[k] + SMOOTHING for k in range(1, n + 1)]
        prior = [p / sum(prior) for p in prior]
        prior_scores.append((brier_score(prior, gold), -math.log(prior[gold - 1])))
    top, top_count = max(((k, model[k]) for k in range(1, n_max + 1)), key=lambda kv: kv[1])
    model_share, human_share = top_count / total, human[top] / len(rows)
    return {"samples_per_row": K, "model_position_hist": model_hist, "human_position_hist": human_hist,
            "tvd": tvd, "brier": statistics.mean(b for b, _ in scores), "log_loss": statistics.mean(loss for _, loss in scores),
            "marginal_prior": {"brier": statistics.mean(b for b, _ in prior_scores),
                               "log_loss": statistics.mean(loss for _, loss in prior_scores)},
            "collapse": {"flag": model_share - human_share > collapse_margin, "position": top,
                         "model_share": model_share, "human_share": human_share}}


def complete_rows(model, tokenizer, rows, prompt, cfg, world, num_samples, greedy):
    """`num_samples` completions of every row (each rank decodes its share of the rows). Returns, in
    row order, one (texts, truncated flags) pair per row."""
    mine = list(range(world.rank, len(rows), world.size))
    results = []
    # eval_batch_size counts prompts: with the shared prefix a prompt's samples cost one prefill.
    for lo in range(0, len(mine), cfg.eval_batch_size):
        idx = mine[lo:lo + cfg.eval_batch_size]
        with distributed.autocast(cfg.bf16, world.device):
            out = rollout.generate(model, tokenizer, [prompt.text(tokenizer, rows[i]) for i in idx], num_samples,
                                   cfg.max_completion_length, temperature=1.0, greedy=greedy,
                                   shared_prefix=cfg.shared_prefix)
        truncated = out.truncated.tolist()
        for j, i in enumerate(idx):
            span = slice(j * num_samples, (j + 1) * num_samples)
            results.append((i, out.texts[span], truncated[span]))
    return [(texts, truncated) for _, texts, truncated in sorted(distributed.all_gather_list(results))]


def evaluate(model, tokenizer, rows, train_rows, prompt, cfg, world):
    """Greedy accuracy in every view with its baselines, the published checkpoints on the same rows,
    and (eval_samples > 0) simulation quality from sampled answers. Reads from cfg: eval_views, seed,
    eval_samples, eval_batch_size, max_completion_length, shared_prefix, bf16.

    Returns (metrics, predictions): the same metrics on every rank, and the original view's greedy
    answer per row."""
    model.eval()
    metrics, predictions = {"views": {}}, []
    with distributed.full_params(model):
        for view in cfg.eval_views:
            shown = view_rows(rows, view, cfg.seed)
            outputs = complete_rows(model, tokenizer, shown, prompt, cfg, world, 1, greedy=True)
            parsed = [rewards.parse_choice(texts[0], truncated[0], row, prompt.answer_only)
                      for (texts, truncated), row in zip(outputs, shown)]
            choices = [choice for choice, _ in parsed]
            metrics["views"][view] = view_metrics(shown, choices, [ok for _, ok in parsed], train_rows, view)
            if view == "original":
                predictions = [{"id": row.get("id"), "gold": row["gold_index"], "prediction": choice,
                                "completion": texts[0]} for row, choice, (texts, _) in zip(shown, choices, outputs)]
                labelled = [(row, texts[0]) for row, (texts, _) in zip(shown, outputs) if row.get("opinion_direction")]
                if labelled and not prompt.answer_only:
                    metrics["opinion_accuracy"] = accuracy_ci(
                        [rewards.parse_opinion(text) == row["opinion_direction"] for row, text in labelled])
        if cfg.eval_samples:
            outputs = complete_rows(model, tokenizer, rows, prompt, cfg, world, cfg.eval_samples, greedy=False)
            sampled = [[rewards.parse_choice(text, truncated, row, prompt.answer_only)[0]
                        for text, truncated in zip(texts, truncated_flags)]
                       for (texts, truncated_flags), row in zip(outputs, rows)]
            metrics["simulation"] = simulation_metrics(rows, sampled, train_rows)
    metrics["reference_checkpoints"] = reference_metrics(rows)
    metrics.update(upstream_keys(metrics["views"].get("original") or next(iter(metrics["views"].values())),
                                 len(rows)))
    return metrics, predictions


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
