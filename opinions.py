"""The viewer's opinion shift as a distribution, and its proper scores beside its baselines.

After the human's click, the answer-mode prompt's next tokens are "</answer><opinion>" and the
direction: choices.answer_logprobs reads p(direction | prompt, click) exactly, in the same forward as
the click. Each participant has one label (the pre/post survey), so rows of one participant share it;
scores are given per row and per participant (each participant's mean, then the mean over them).

Baselines, fit on the training split's participants (one vote each):
- uniform over the three directions;
- the direction prior of the row's issue (add-0.5 smoothed);
- "no change", as upstream scores it (the accuracy of always answering no_change);
- a softmax over the directions linear in the pre-study opinion index (`opinion_before`, 0-1),
  per issue: what a simulator that reads the profile's "support score" should at least match;
- the direction table of the row's issue and stated initial viewpoint (`initial_viewpoint`, the
  prompt's "Initial Viewpoint:" line), shrunk toward the issue's prior: what the profile's words say.
"""
import math
import statistics
from collections import Counter

import torch

import choices
from schema import OPINION_LABELS

VIEWPOINT_STRENGTH = 2.0  # the issue prior's weight, in participants, in each viewpoint's direction table
LOGISTIC_L2 = 1e-4  # keeps the fit finite where a direction is rare (no_change: 2-4% of participants)


def label_index(row):
    """The row's direction as a 1-based index into OPINION_LABELS (None without a label)."""
    label = row.get("opinion_direction")
    return OPINION_LABELS.index(label) + 1 if label else None


def participants(rows):
    """The first row of each labelled participant of `rows` (one vote each: the label, the issue, the
    profile's fields never vary within a participant)."""
    seen = {}
    for row in rows:
        if row.get("opinion_direction"):
            seen.setdefault(row["participant_key"], row)
    return list(seen.values())


def _normalised(counts):
    weights = [counts[label] + choices.SMOOTHING for label in OPINION_LABELS]  # as the position prior
    return [w / sum(weights) for w in weights]


def direction_prior(train_rows):
    """row -> P(direction) of the row's issue among the training participants (all issues' where the
    training split has none of that issue)."""
    people = [(row.get("issue"), row["opinion_direction"]) for row in participants(train_rows)]
    overall = _normalised(Counter(label for _, label in people))
    by_issue = {issue: _normalised(Counter(label for i, label in people if i == issue))
                for issue in {issue for issue, _ in people}}
    return lambda row: by_issue.get(row.get("issue"), overall)


def fit_logistic(x, y, n_classes=len(OPINION_LABELS)):
    """Maximum likelihood (with a small L2) of logits a_d + b_d x, the last class's fixed at 0.
    x: [n] floats, y: [n] 0-based labels. Returns the [n_classes - 1, 2] parameters."""
    x, y = torch.tensor(x, dtype=torch.float64), torch.tensor(y)
    params = torch.zeros(n_classes - 1, 2, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([params], max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(_logits(params, x), y) + LOGISTIC_L2 * params.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return params.detach()


def _logits(params, x):
    free = params[:, 0][None] + params[:, 1][None] * x[:, None]
    return torch.cat([free, torch.zeros(len(x), 1, dtype=free.dtype)], dim=1)


def index_baseline(train_rows):
    """row -> P(direction | issue, pre-study index): the per-issue logistic on `opinion_before`,
    fit on the training participants; the direction prior for a row without the index or of an issue
    the training split cannot fit (fewer than 2 directions among its participants)."""
    prior, people = direction_prior(train_rows), participants(train_rows)
    fits = {}
    for issue in {row.get("issue") for row in people}:
        pairs = [(row["opinion_before"], OPINION_LABELS.index(row["opinion_direction"])) for row in people
                 if row.get("issue") == issue and row.get("opinion_before") is not None]
        if len({label for _, label in pairs}) >= 2:
            fits[issue] = fit_logistic([b for b, _ in pairs], [label for _, label in pairs])

    def predict(row):
        params, before = fits.get(row.get("issue")), row.get("opinion_before")
        if params is None or before is None:
            return prior(row)
        return torch.softmax(_logits(params, torch.tensor([float(before)], dtype=torch.float64)), -1)[0].tolist()

    return predict


def viewpoint_baseline(train_rows):
    """row -> P(direction | issue, initial viewpoint): among the training participants of the row's
    issue who stated the same viewpoint, the directions' counts plus VIEWPOINT_STRENGTH x the issue's
    direction prior, normalised (the prior itself for a viewpoint no training participant stated)."""
    prior, counts = direction_prior(train_rows), {}
    for row in participants(train_rows):
        counts.setdefault((row.get("issue"), row.get("initial_viewpoint")), Counter())[row["opinion_direction"]] += 1

    def predict(row):
        seen = counts.get((row.get("issue"), row.get("initial_viewpoint")), Counter())
        weights = [seen[label] + VIEWPOINT_STRENGTH * p for label, p in zip(OPINION_LABELS, prior(row))]
        return [w / sum(weights) for w in weights]

    return predict


# The fitted baselines an evaluation scores beside the model, by their key in eval.json.
BASELINES = {"prior": direction_prior, "baseline": index_baseline, "viewpoint": viewpoint_baseline}


def opinion_scores(rows, distributions):
    """Scores of per-row direction distributions (each may sum to less than 1: the rest is invalid
    mass) against the labels of `rows` (all labelled): log-loss (raw and renormalised), Brier, valid
    mass, the predicted and actual share of each direction and their TVD, the accuracy of the mode,
    the log-loss per participant and the row-to-row spread."""
    pseudo = [{"gold_index": label_index(row), "n_options": len(OPINION_LABELS)} for row in rows]
    scores = choices.distribution_scores(pseudo, distributions)
    predicted, human = scores.pop("position_mass"), scores.pop("human_positions")
    scores["shares"] = {label: predicted[str(k)] for k, label in enumerate(OPINION_LABELS, 1)}
    scores["human_shares"] = {label: human[str(k)] for k, label in enumerate(OPINION_LABELS, 1)}
    scores["accuracy"] = _mean([mode_credit(p, g["gold_index"]) for p, g in zip(distributions, pseudo)])
    per_person = {}
    for row, p, g in zip(rows, distributions, pseudo):
        per_person.setdefault(row["participant_key"], []).append(-math.log(max(p[g["gold_index"] - 1], 1e-300)))
    scores["participant_logloss"] = _mean([_mean(v) for v in per_person.values()])
    scores["participants"] = len(per_person)
    scores["spread"] = row_spread(distributions)
    return scores


def mode_credit(distribution, gold):
    """1 when `gold` is the most likely outcome, 1/m when it ties with m - 1 others: a random
    tie-break's expected accuracy (a sampled estimate where no sample parsed is uniform, and favours
    no direction)."""
    top = max(distribution)
    tied = [k for k, p in enumerate(distribution, 1) if p == top]
    return (gold in tied) / len(tied)


def row_spread(distributions):
    """How much a distribution moves from row to row: the across-row standard deviation of each
    direction's (renormalised) probability, averaged over the directions. 0 for one distribution for
    everybody (the prior, within an issue); what a simulator that reads the person must have."""
    return _mean([statistics.pstdev(column) for column in zip(*map(choices.renormalised, distributions))])


def opinion_metrics(rows, distributions, train_rows, method, valid_mass=None):
    """The model's opinion scores beside uniform, the direction prior, the pre-study-index logistic
    and the initial viewpoint's table, and the accuracy of "no change", overall and per issue and
    study, on the labelled rows; with the calibration table. None when no row is labelled.
    `valid_mass`: each row's where it is not the distribution's sum (as choices.choice_metrics)."""
    labelled = [i for i, row in enumerate(rows) if row.get("opinion_direction")]
    if not labelled:
        return None
    fitted = {key: fit(train_rows) for key, fit in BASELINES.items()}
    uniform = [1 / len(OPINION_LABELS)] * len(OPINION_LABELS)

    def scored(subset):
        rows_, dists = [rows[i] for i in subset], [distributions[i] for i in subset]
        model = opinion_scores(rows_, dists)
        if valid_mass is not None:
            model["valid_mass"] = _mean([valid_mass[i] for i in subset])
        return {"model": model,
                **{key: opinion_scores(rows_, [predict(r) for r in rows_]) for key, predict in fitted.items()},
                "uniform": opinion_scores(rows_, [uniform] * len(rows_)),
                "no_change_accuracy": _mean([r["opinion_direction"] == "no_change" for r in rows_])}

    # issues no labelled training participant holds: every baseline there is the pooled prior's
    trained = {str(row.get("issue")) for row in participants(train_rows)}
    return {**scored(labelled), "method": method,
            "pooled_issues": sorted({str(rows[i].get("issue")) for i in labelled} - trained),
            "by_group": {name: scored(idx) for name, idx in choices.grouped(rows, labelled, choices.issue_and_study)},
            "by_issue": {name: scored(idx) for name, idx in choices.grouped(rows, labelled, lambda r: str(r.get("issue")))},
            "calibration": choices.calibration_table([label_index(rows[i]) for i in labelled],
                                                     [distributions[i] for i in labelled])}


def sampled_distribution(opinions):
    """An estimate of p(direction) from K sampled opinions (None = unparseable), add-0.5 smoothed over
    the three directions and the invalid bucket, as choices.sampled_distribution estimates p(k)."""
    return choices.sampled_distribution([OPINION_LABELS.index(o) + 1 if o else None for o in opinions],
                                        len(OPINION_LABELS))


# eval.json's top-level opinion keys: (the scorer, its score).
HEADLINE_KEYS = {"opinion_logloss": ("model", "logloss"), "opinion_brier": ("model", "brier"),
                 "opinion_prior_logloss": ("prior", "logloss"), "opinion_baseline_logloss": ("baseline", "logloss"),
                 "opinion_viewpoint_logloss": ("viewpoint", "logloss"), "opinion_uniform_logloss": ("uniform", "logloss")}


def headline_keys(opinion):
    """The opinion's scores at the top level of eval.json (null where no row carries a label)."""
    return {**{key: opinion[scorer][score] if opinion else None for key, (scorer, score) in HEADLINE_KEYS.items()},
            "opinion_method": opinion["method"] if opinion else None}


def _mean(values):
    return sum(values) / len(values)
