"""Rewards for one batch of completions: every component returned for logging, plus their weighted sum.

- accuracy: the option number in `<answer>N</answer>` (a bare integer, one answer tag) equals the
  clicked option -> 1, else 0. Where the row has an opinion label, the `<opinion>` part is scored
  too and the two are averaged, as upstream's `pure_accuracy_reward` does. Its optimum is a point
  mass on the most likely click: a policy trained on it stops simulating.
- calibration: a proper scoring rule over the group of G samples of a prompt, maximised only when the
  policy's choice distribution equals the humans' (`calibration_rewards`); where the row has an
  opinion label, the same rule on the opinions, averaged with the click's as accuracy averages its
  two parts. Both parts are proper, so is their mean: the expected update ascends
  -(||p_click - q_click||^2 + ||p_opinion - q_opinion||^2) / 2 (tests/test_bandit.py).
- format: the whole completion has the tags in the strict order the prompt asks for.
With GAIL_USE=1 the discriminator's reward (disc.py) joins as one more component, `mix_disc`.
"""
import re
from collections import Counter
from dataclasses import dataclass

from prompts import ANSWER_PREFIX
from schema import OPINION_LABELS

ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)
OPINION_TAG = re.compile(r"<opinion>(.*?)</opinion>", re.S)
BARE_INTEGER = re.compile(r"[0-9]+")  # ASCII digits only: no sign, no punctuation, no words
THINK_FORMAT = re.compile(
    r"\s*<think>(?:(?!</?(?:think|answer|opinion)>).)+</think>\s*"
    r"<answer>\s*[0-9]+\s*</answer>\s*"
    r"<opinion>\s*(?:increase|decrease|no_change)\s*</opinion>\s*", re.S)
ANSWER_FORMAT = re.compile(
    r"<answer>\s*[0-9]+\s*</answer>\s*<opinion>\s*(?:increase|decrease|no_change)\s*</opinion>\s*", re.S)

# Upstream recipe names map onto ours, so their `reward_funcs` lists run unchanged.
REWARD_ALIASES = {"pure_accuracy_reward": "accuracy", "accuracy_reward": "accuracy",
                  "format_reward": "format", "formating": "format"}
REWARD_NAMES = ("accuracy", "calibration", "format")
# Below this many prompts a step, the batch std's tilt of the calibration reward toward the mode is
# measurable (calibration_rewards); the trainer says so.
BATCH_STD_MIN_PROMPTS = 16


def tilts_calibration(reward_funcs, scale_rewards, prompts_per_step):
    return "calibration" in reward_funcs and scale_rewards == "batch" and prompts_per_step < BATCH_STD_MIN_PROMPTS


def canonical_reward_names(names):
    out = [REWARD_ALIASES.get(name, name) for name in names]
    unknown = [name for name in out if name not in REWARD_NAMES]
    if unknown:
        raise ValueError(f"unknown reward function(s) {unknown}; known: {list(REWARD_NAMES)} "
                         f"and upstream aliases {sorted(REWARD_ALIASES)}")
    return out


def full_text(completion, answer_only, truncated):
    """The assistant turn as the reward sees it. In answer-only mode the turn was opened with
    ANSWER_PREFIX by the prompt, and a turn that ended right after the number closes the tag."""
    if not answer_only:
        return completion
    text = ANSWER_PREFIX + completion
    if not truncated and "</answer>" not in completion:
        text += "</answer>"
    return text


def parse_answer(text):
    """(option number or None, reason). Exactly one answer tag holding a bare integer."""
    tags = ANSWER_TAG.findall(text)
    if not tags:
        return None, "no_answer_tag"
    if len(tags) > 1:
        return None, "several_answer_tags"
    payload = tags[0].strip()
    if not BARE_INTEGER.fullmatch(payload):
        return None, "not_a_bare_integer"
    return int(payload), "parsed"


def parse_opinion(text):
    tags = OPINION_TAG.findall(text)
    if len(tags) != 1 or tags[0].strip() not in OPINION_LABELS:
        return None
    return tags[0].strip()


@dataclass
class Parsed:
    """One completion as the rewards and the evaluation read it (parsed once, range-checked once)."""
    choice: object      # the option number, 1..n_options, or None
    reason: str         # parse outcome: parsed | no_answer_tag | several_answer_tags | not_a_bare_integer | out_of_range
    formatted: bool     # the whole turn has the tags in the strict order the prompt asks for
    opinion: object     # the <opinion> label, or None


def parse(completion, truncated, row, answer_only):
    text = full_text(completion, answer_only, truncated)
    choice, reason = parse_answer(text)
    if choice is not None and not 1 <= choice <= row["n_options"]:
        choice, reason = None, "out_of_range"
    return Parsed(choice, reason, format_reward(text, answer_only) == 1.0, parse_opinion(text))


def parse_choice(completion, truncated, row, answer_only):
    """(option number or None, strict format ok) of one completion."""
    parsed = parse(completion, truncated, row, answer_only)
    return parsed.choice, parsed.formatted


def accuracy_reward(parsed, row, counts):
    parts = [float(parsed.choice == row["gold_index"])]
    label = row.get("opinion_direction")
    if label:
        counts["opinion_labelled"] += 1
        counts["opinion_parsed"] += parsed.opinion is not None
        counts["opinion_correct"] += parsed.opinion == label
        parts.append(float(parsed.opinion == label))
    return sum(parts) / len(parts)


def format_reward(text, answer_only):
    pattern = ANSWER_FORMAT if answer_only else THINK_FORMAT
    return float(pattern.fullmatch(text) is not None)


def calibration_rewards(choices, golds, num_generations):
    """r_i = 1[a_i = gold] - #{j != i in i's group : a_j = a_i} / (G - 2), for the G samples of each
    prompt (consecutive), an unparseable answer (None) being its own outcome, never the gold.

    Why it is proper. Let p be the policy's distribution over outcomes for a state and q the humans'
    (the gold is a draw from q, independent of the samples), and write the penalty as w per match.
    Given a_i = k the click matches with probability q_k and each of the G - 1 other samples equals k
    with probability p_k: E[r_i | a_i = k] = q_k - w (G - 1) p_k. Plain REINFORCE would need
    w = 1 / (G - 1). GRPO's advantage subtracts the group mean, and the other samples' penalties count
    a_i too (each matches it with probability p_k), so E[sum_{j != i} r_j | a_i = k] = c - w (G - 1) p_k
    and
        E[A_i | a_i = k] = (G - 1)/G q_k - w (G - 1)(G - 2)/G p_k + c'.
    With w = 1 / (G - 2) this is (G - 1)/G (q_k - p_k) + c', and since the gradient only moves mass
    between outcomes (sum_k grad p_k = 0), the expected update is
        (G - 1)/G sum_k grad(p_k) (q_k - p_k) = -(G - 1)/(2G) grad(sum_k (p_k - q_k)^2):
    gradient ascent on the negative Brier distance between p and q, strictly concave, maximised only
    at p = q, where every outcome's expected advantage is 0. The accuracy reward's expected update,
    sum_k grad(p_k) q_k, instead grows p on argmax q until p is a point mass.

    A per-group std (scale_rewards=group) would reweight each group by its composition and undo
    this (a tabular bandit then settles at TVD 0.12-0.18 from q instead of 0.01-0.02; check_config
    refuses it). `none` keeps it exact. The std of the global batch (`batch`) holds each sample's own
    reward and its group's too, so it tilts E[A_i | a_i = k] toward the mode by about 1/B for B prompts
    a step: at p = q and G = 8, B = 2, the mode's expected advantage is 0.12 std above the rarest
    option's; at B = 8 and 32 the gap is inside Monte-Carlo noise (`python -m bench.scale_rewards`
    prints them; tests/test_bandit.py checks them). The trainer
    says so below BATCH_STD_MIN_PROMPTS prompts a step.
    """
    G = num_generations
    out = []
    for start in range(0, len(choices), G):
        group = choices[start:start + G]
        counts = Counter(group)
        for choice, gold in zip(group, golds[start:start + G]):
            out.append(float(choice is not None and choice == gold) - (counts[choice] - 1) / (G - 2))
    return out


def calibration_with_opinion(parsed, rows, num_generations):
    """The calibration rule on the clicks, averaged with the same rule on the opinions where the row
    has a label (the G samples of a prompt share its row, so a whole group has a label or none)."""
    clicks = calibration_rewards([p.choice for p in parsed], [row["gold_index"] for row in rows], num_generations)
    shifts = calibration_rewards([p.opinion for p in parsed], [row.get("opinion_direction") for row in rows],
                                 num_generations)
    return [(c + s) / 2 if row.get("opinion_direction") else c for c, s, row in zip(clicks, shifts, rows)]


def score(parsed, rows, reward_funcs, reward_weights, num_generations):
    """Rewards of the parsed completions parsed[i] against rows[i] (G consecutive samples per prompt).

    Returns (total rewards, {component: rewards}, Counter of parse outcomes).
    """
    counts = Counter(p.reason for p in parsed)
    # Every component is computed and logged; the weights decide what is optimised.
    components = {
        "accuracy": [accuracy_reward(p, row, counts) for p, row in zip(parsed, rows)],
        "format": [float(p.formatted) for p in parsed],
    }
    if num_generations >= 3:  # calibration compares a sample with at least two others
        components["calibration"] = calibration_with_opinion(parsed, rows, num_generations)
    total = [sum(w * components[name][i] for name, w in zip(reward_funcs, reward_weights))
             for i in range(len(parsed))]
    return total, components, counts


def mix_disc(base, disc_rewards, gail_weight):
    """Base and discriminator rewards weighted (1, GAIL_WEIGHT), the weights normalised to sum 1,
    as upstream: GAIL_WEIGHT 0.5 gives 2/3 base + 1/3 discriminator."""
    return [(b + gail_weight * d) / (1.0 + gail_weight) for b, d in zip(base, disc_rewards)]
