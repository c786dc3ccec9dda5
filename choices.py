"""The exact choice distribution of a prompt, and the proper scores of a simulator on it.

In answer mode the prompt ends with `<answer>`, so the model's next tokens are its choice. For each
option k, p(k) = P(the tokens of "k") × P(the tag closes after them), where closing is either a stop
token (the turn ends; the parser closes the tag) or the tokens of "</answer>", the last of them read
as any token whose text starts with it (">", but also "><", ">\n", …: the text closes the tag either
way, and a model not taught the tag's own tokens writes those often). A prompt and all its
options run as one sequence under the tree mask of the shared-prefix forward (grpo.tree_attention_mask):
one forward per row, exact for any number of options (option 1 excludes "10", "11", … because "0"
and "1" do not close the tag). Mass on anything else (other spellings, other text, numbers outside
the slate) is the invalid mass. The opinion after the human's click rides in the same forward: three
more branches, "gold</answer><opinion>d</opinion>" for each direction d, each scored from d on, give
p(d | prompt, click) the same way (opinions.py scores it), closed by "</opinion>" alone: the model
opened that tag itself, and the reward's parser reads a turn that ends inside it as no opinion. The
click's branches do not see them.

Scores, each beside uniform and the position prior of the training split:
- log-loss of the human choice: raw (-log p(gold), invalid mass counts as loss) and renormalised
  over the valid options (-log q(gold), q = p / valid mass);
- Brier score of q;
- TVD between the mean q over rows (by position) and the humans' click positions;
- valid mass, and a calibration table (predicted q of every (row, option) pair, binned, against how
  often that option was the click).
"""
import functools
import math
from collections import Counter

import torch

import grpo
from prompts import CLOSE_TAG, OPINION_CLOSE, OPINION_OPEN
from schema import OPINION_LABELS

SMOOTHING = 0.5  # additive pseudo-count of the position prior
CALIBRATION_BINS = 10


# ---------------------------------------------------------------------------------------------
# The distribution


def encoded(tokenizer, text):
    """One piece of an answer on its own (a number, a tag, a direction): every branch is built from these."""
    return tokenizer.encode(text, add_special_tokens=False)


def option_branches(tokenizer, n_options):
    """Token ids of each option's number and of the closing tag: ([ids of "1"], …), ids of "</answer>"."""
    return [encoded(tokenizer, str(k)) for k in range(1, n_options + 1)], encoded(tokenizer, CLOSE_TAG)


def opinion_branches(tokenizer, gold):
    """What follows the prompt when the viewer clicked `gold`, tag by tag: the tokens of
    "gold</answer>", of "<opinion>", of each direction (in OPINION_LABELS order), of "</opinion>"."""
    return (encoded(tokenizer, str(gold)) + encoded(tokenizer, CLOSE_TAG), encoded(tokenizer, OPINION_OPEN),
            [encoded(tokenizer, label) for label in OPINION_LABELS], encoded(tokenizer, OPINION_CLOSE))


def answer_branches(tokenizer, n_options, gold=None):
    """The branches of one prompt's tree, each (tokens, label start, label end): every option's
    "k</answer>", and with `gold` every direction's "gold</answer><opinion>d</opinion>", whose label
    is d (scored given the click and the tags before it)."""
    numbers, close = option_branches(tokenizer, n_options)
    branches = [(ids + close, 0, len(ids)) for ids in numbers]
    if gold is not None:
        answered, opened, words, end = opinion_branches(tokenizer, gold)
        prefix = answered + opened
        branches += [(prefix + ids + end, len(prefix), len(prefix) + len(ids)) for ids in words]
    return branches


@torch.no_grad()
def answer_logprobs(model, tokenizer, prompt_text, n_options, stop_ids, gold=None):
    """(log p(k) for k = 1..n_options [n], log p(d | the click was `gold`) for d in OPINION_LABELS [3],
    or None without `gold`) of one answer-mode prompt, at temperature 1, from one forward."""
    device = next(model.parameters()).device
    prompt = torch.tensor(tokenizer(prompt_text, add_special_tokens=False).input_ids, device=device)
    branches = answer_branches(tokenizer, n_options, gold)
    tokens = [torch.tensor(ids, device=device) for ids, _, _ in branches]
    window = getattr(model.config, "sliding_window", None)
    if window and len(prompt) + max(len(t) for t in tokens) > window:  # the tree mask has no window
        scored = [_branch_logprobs(model, prompt, t, start, end) for t, (_, start, end) in zip(tokens, branches)]
    else:
        scored = _tree_logprobs(model, prompt, tokens, [(start, end) for _, start, end in branches])
    stops = torch.tensor(stop_ids, device=device)
    out = []
    for i, ((ids, start, end), (token_logp, after_label, before_last)) in enumerate(zip(branches, scored)):
        # The tag closes after the label: the closing tag follows (its last token as any token that
        # starts with that token's text), or, for the click, whose tag the prompt opened, the turn
        # ends (the reward's parser closes it: rewards.full_text).
        closers = torch.tensor(closing_ids(tokenizer, ids[-1]), device=device)
        close_logp = token_logp[end - start:-1].sum() + torch.logsumexp(before_last[closers], 0)
        if i < n_options:
            close_logp = torch.logaddexp(torch.logsumexp(after_label[stops], 0), close_logp)
        out.append(token_logp[:end - start].sum() + close_logp)
    out = torch.stack(out)
    return out[:n_options], (out[n_options:] if gold is not None else None)


@functools.lru_cache(maxsize=8)
def closing_ids(tokenizer, last_id):
    """The ids of every token whose text starts with token `last_id`'s: each ends a closing tag as
    the text reads it (">" and "><" alike)."""
    text = tokenizer.decode([last_id])
    return [i for i in range(len(tokenizer)) if tokenizer.decode([i]).startswith(text)]


def _tree_logprobs(model, prompt, branches, spans):
    """Per branch: (log-prob of each of its tokens from its label's start, the next-token
    log-distribution after its label, the one before its last token). The prompt and every branch
    run as one sequence: each branch sees the prompt and its own tokens; logits are computed only
    where a branch is scored."""
    P, device = len(prompt), prompt.device
    lengths = torch.tensor([len(b) for b in branches], device=device)
    tokens = torch.cat([prompt] + branches)
    positions = torch.cat([torch.arange(P, device=device)] +
                          [P + torch.arange(n, device=device) for n in lengths.tolist()])
    starts = (torch.cumsum(lengths, 0) - lengths).tolist()
    scored = torch.cat([torch.arange(b + s, b + len(branch), device=device)  # offsets into tokens[P:]
                        for b, branch, (s, _) in zip(starts, branches, spans)])
    predictors = P + scored - 1
    # A branch's first token is predicted by the prompt's last one.
    predictors[torch.isin(scored, torch.tensor(starts, device=device))] = P - 1
    logits = model(input_ids=tokens[None], position_ids=positions[None], use_cache=False,
                   attention_mask=grpo.tree_attention_mask(P, lengths, model.config._attn_implementation),
                   logits_to_keep=predictors).logits[0]
    logp = torch.log_softmax(logits.float(), dim=-1)  # row i predicts tokens[P + scored[i]]
    token_logp = logp.gather(-1, tokens[P + scored][:, None]).squeeze(-1)
    sizes = [len(branch) - s for branch, (s, _) in zip(branches, spans)]  # each branch's scored tokens
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return [(token_logp[o:o + n], logp[o + e - s], logp[o + n - 1])
            for o, n, (s, e) in zip(offsets, sizes, spans)]


def _branch_logprobs(model, prompt, branch, start, end):
    """One branch as its own prompt + branch sequence (models whose attention window is too short)."""
    tokens = torch.cat([prompt, branch])[None]
    logits = model(input_ids=tokens, use_cache=False, logits_to_keep=len(branch) - start + 1).logits[0, :-1]
    logp = torch.log_softmax(logits.float(), dim=-1)  # row i predicts branch[start + i]
    return logp.gather(-1, branch[start:, None]).squeeze(-1), logp[end - start], logp[len(branch) - start - 1]


# ---------------------------------------------------------------------------------------------
# Scores


def position_prior(train_rows):
    """P(click position | slate size) from the training split, add-0.5 smoothed: the baseline a
    simulator must beat (uniform where no training slate has that size)."""
    counts = Counter((row["n_options"], row["gold_index"]) for row in train_rows)

    def prior(n):
        weights = [counts[n, k] + SMOOTHING for k in range(1, n + 1)]
        return [w / sum(weights) for w in weights]

    return prior


def cloning_targets(tokenizer, row, prior, smoothing, opinion_prior, opinion_smoothing, end_id):
    """The behaviour-cloning targets of a row, [(token ids, weight, index of the first scored token)].

    The click: every option's "k</answer>" with weight (1 - `smoothing`) 1[k = click] + `smoothing`
    x the training split's position prior for the slate's size (label smoothing). A model cloned on a
    few hundred rows reads confident slot preferences into noise; the mixture keeps eps x prior on
    every option. Toward the prior, not uniform: where the prior is sharp (the gun-control rows' last
    slot) it costs almost nothing.
    The opinion, where the row has a label: "click</answer><opinion>d</opinion>" and the end of the
    turn, with weight (1 - `opinion_smoothing`) 1[d = label] + `opinion_smoothing` x
    `opinion_prior(row)` (the issue's direction prior, or the pre-study-index logistic: row ->
    P(direction), opinions.py), scored from "<opinion>" on: the click's tokens are the click target's, and
    the tag, its tokens the same in every direction, is learnt with weight 1, so that samples write
    it in the tokens the evaluation reads."""
    targets = [(ids, weight, 0) for (ids, _, _), weight in
               zip(answer_branches(tokenizer, row["n_options"]), smoothed(prior(row["n_options"]), row["gold_index"], smoothing))
               if weight > 0]
    return targets + opinion_targets(tokenizer, row, opinion_prior, opinion_smoothing, end_id)


def opinion_targets(tokenizer, row, opinion_prior, opinion_smoothing, end_id):
    """The opinion's share of cloning_targets (none where the row has no label): scored from
    "<opinion>" on, after the human's click."""
    label = row.get("opinion_direction")
    if not label:
        return []
    answered, opened, words, close = opinion_branches(tokenizer, row["gold_index"])
    weights = smoothed(opinion_prior(row), OPINION_LABELS.index(label) + 1, opinion_smoothing)
    return [(answered + opened + ids + close + [end_id], weight, len(answered))
            for ids, weight in zip(words, weights) if weight > 0]


def smoothed(prior, gold, smoothing):
    """(1 - smoothing) x the one-hot of `gold` (1-based) + smoothing x `prior`."""
    return [(1 - smoothing) * (k == gold) + smoothing * p for k, p in enumerate(prior, 1)]


def brier_score(probabilities, gold):
    """Multi-class Brier score of one row's choice distribution (a list over options 1..n)."""
    return sum((p - (k == gold)) ** 2 for k, p in enumerate(probabilities, 1))


def distribution_scores(rows, distributions):
    """Mean scores of per-row distributions over options 1..n (each may sum to less than 1: the
    rest is invalid mass) against the human clicks."""
    raw, renorm, brier, valid = [], [], [], []
    n_max = max(row["n_options"] for row in rows)
    predicted, human = [0.0] * n_max, [0.0] * n_max
    for row, p in zip(rows, distributions):
        q = renormalised(p)
        gold = row["gold_index"]
        raw.append(-math.log(max(p[gold - 1], 1e-300)))
        renorm.append(-math.log(max(q[gold - 1], 1e-300)))
        brier.append(brier_score(q, gold))
        valid.append(sum(p))
        for k, x in enumerate(q):
            predicted[k] += x / len(rows)
        human[gold - 1] += 1 / len(rows)
    return {"logloss": _mean(raw), "logloss_renorm": _mean(renorm), "brier": _mean(brier),
            "tvd": 0.5 * sum(abs(a - b) for a, b in zip(predicted, human)), "valid_mass": _mean(valid),
            "position_mass": {str(k): x for k, x in enumerate(predicted, 1)},
            "human_positions": {str(k): x for k, x in enumerate(human, 1)}, "n": len(rows)}


def renormalised(p):
    """A distribution with invalid mass scaled to sum to 1 (uniform where nothing is valid)."""
    mass = sum(p)
    return [x / mass for x in p] if mass > 0 else [1 / len(p)] * len(p)


def calibration_table(golds, distributions, bins=CALIBRATION_BINS):
    """Every (row, outcome) pair's renormalised probability, binned: mean predicted vs how often the
    outcome was what the human did (`golds`, 1-based). A calibrated simulator lies on the diagonal."""
    table = [{"lo": b / bins, "hi": (b + 1) / bins, "n": 0, "predicted": 0.0, "observed": 0.0} for b in range(bins)]
    for gold, p in zip(golds, distributions):
        mass = sum(p) or 1.0
        for k, x in enumerate(p, 1):
            cell = table[min(int(x / mass * bins), bins - 1)]
            cell["n"] += 1
            cell["predicted"] += x / mass
            cell["observed"] += k == gold
    for cell in table:
        if cell["n"]:
            cell["predicted"] /= cell["n"]
            cell["observed"] /= cell["n"]
    return table


def collapse(scores, margin=0.25):
    """Does the model pile onto one position? Its most likely position's mass against the humans'
    share of that position; flagged beyond `margin`."""
    top = max(scores["position_mass"], key=scores["position_mass"].get)
    model, human = scores["position_mass"][top], scores["human_positions"][top]
    return {"flag": model - human > margin, "position": int(top), "model_share": model, "human_share": human}


def choice_metrics(rows, distributions, train_rows, valid_mass=None):
    """The model's scores beside uniform and the position prior, overall and per issue and study,
    with the calibration table and the collapse flag. `valid_mass`: each row's valid mass where it is
    not the distribution's sum (a sampled estimate's: the share of samples that parse)."""
    prior = position_prior(train_rows)

    def scored(subset):
        rows_, dists = [rows[i] for i in subset], [distributions[i] for i in subset]
        model = distribution_scores(rows_, dists)
        if valid_mass is not None:
            model["valid_mass"] = _mean([valid_mass[i] for i in subset])
        return {"model": model,
                "prior": distribution_scores(rows_, [prior(r["n_options"]) for r in rows_]),
                "uniform": distribution_scores(rows_, [[1 / r["n_options"]] * r["n_options"] for r in rows_])}

    overall = scored(range(len(rows)))
    return {**overall, "by_group": {name: scored(idx) for name, idx in grouped(rows, range(len(rows)), issue_and_study)},
            "calibration": calibration_table([r["gold_index"] for r in rows], distributions), "collapse": collapse(overall["model"])}


def issue_and_study(row):
    return f"{row.get('issue')} / {row.get('participant_study')}"


def grouped(rows, indices, key):
    """(key, [its indices]) for the rows of `indices`, by key(row), in the keys' order."""
    groups = {}
    for i in indices:
        groups.setdefault(key(rows[i]), []).append(i)
    return sorted(groups.items())


def sampled_distribution(answers, n_options):
    """An estimate of p(k) from K sampled answers (None = unparseable), add-0.5 smoothed over the n
    options and the invalid bucket, so a gold never sampled still has a finite log-loss."""
    counts = Counter(answers)
    total = len(answers) + SMOOTHING * (n_options + 1)
    return [(counts[k] + SMOOTHING) / total for k in range(1, n_options + 1)]


def mode(distribution):
    """The most likely outcome (1-based)."""
    return max(range(len(distribution)), key=distribution.__getitem__) + 1


def _mean(values):
    return sum(values) / len(values)
