import pytest

import rewards

ROW = {"gold_index": 3, "n_options": 4, "opinion_direction": "increase"}
UNLABELLED = {"gold_index": 3, "n_options": 4, "opinion_direction": None}


@pytest.mark.parametrize("text, expected, reason", [
    ("<answer>3</answer>", 3, "parsed"),
    ("<answer>\n  3\n  </answer>", 3, "parsed"),
    ("<answer>3.</answer>", None, "not_a_bare_integer"),
    ('<answer>"3"</answer>', None, "not_a_bare_integer"),
    ("<answer>Option 3</answer>", None, "not_a_bare_integer"),
    ("<answer>-3</answer>", None, "not_a_bare_integer"),
    ("<answer>３</answer>", None, "not_a_bare_integer"),  # full-width digit
    ("<answer>3</answer><answer>2</answer>", None, "several_answer_tags"),
    ("3", None, "no_answer_tag"),
    ("<answer>3", None, "no_answer_tag"),
])
def test_parse_answer_is_strict(text, expected, reason):
    assert rewards.parse_answer(text) == (expected, reason)


def score(texts, rows, answer_only=False, truncated=None, funcs=("accuracy", "format"), weights=(1.0, 0.0)):
    truncated = truncated or [False] * len(texts)
    parsed = [rewards.parse(text, cut, row, answer_only) for text, cut, row in zip(texts, truncated, rows)]
    return rewards.score(parsed, rows, list(funcs), list(weights), num_generations=len(texts))


def test_accuracy_counts_out_of_range_and_unparseable():
    total, comps, counts = score(["<answer>3</answer>", "<answer>9</answer>", "<answer>0</answer>", "nope"],
                                 [UNLABELLED] * 4)
    assert comps["accuracy"] == [1.0, 0.0, 0.0, 0.0]
    assert counts["parsed"] == 1 and counts["out_of_range"] == 2 and counts["no_answer_tag"] == 1


def test_opinion_is_averaged_with_the_answer_when_labelled():
    texts = ["<think>x</think><answer>3</answer><opinion>increase</opinion>",
             "<think>x</think><answer>3</answer><opinion>decrease</opinion>",
             "<think>x</think><answer>1</answer><opinion>increase</opinion>",
             "<think>x</think><answer>1</answer>"]
    _, comps, counts = score(texts, [ROW] * 4)
    assert comps["accuracy"] == [1.0, 0.5, 0.5, 0.0]
    assert counts["opinion_labelled"] == 4 and counts["opinion_correct"] == 2
    _, comps, _ = score(texts, [UNLABELLED] * 4)
    assert comps["accuracy"] == [1.0, 1.0, 0.0, 0.0]


def test_answer_only_mode_scores_the_opinion_and_closes_the_turn():
    # The prompt opened the turn with "<answer>"; a turn that ended after the number counts as the click.
    completions = ["3</answer><opinion>increase</opinion>", "3</answer>\n<opinion> decrease </opinion>", "3",
                   "3", "3 because"]
    truncated = [False, False, False, True, False]
    _, comps, _ = score(completions, [ROW] * 5, answer_only=True, truncated=truncated)
    assert comps["accuracy"] == [1.0, 0.5, 0.5, 0.0, 0.0]
    assert comps["format"] == [1.0, 1.0, 0.0, 0.0, 0.0]  # the prompt asks for the opinion too
    _, comps, _ = score(completions, [UNLABELLED] * 5, answer_only=True, truncated=truncated)
    assert comps["accuracy"] == [1.0, 1.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("text, ok", [
    ("<think>a</think>\n<answer>\n3\n</answer>\n<opinion>\nno_change\n</opinion>", True),
    ("<think>a</think><answer>3</answer><opinion>increase</opinion>\n", True),
    ("<answer>3</answer><think>a</think><opinion>increase</opinion>", False),
    ("<think>a</think><answer>3</answer>", False),
    ("<think></think><answer>3</answer><opinion>increase</opinion>", False),
    ("<think>a</think><answer>3</answer><opinion>maybe</opinion>", False),
    ("<think>a</think><answer>3</answer><opinion>increase</opinion> extra", False),
    ("<think>a <answer>1</answer></think><answer>3</answer><opinion>increase</opinion>", False),
])
def test_format_requires_strict_tag_order(text, ok):
    assert rewards.format_reward(text, answer_only=False) == float(ok)


def test_weighted_sum_and_every_component_returned():
    texts = ["<think>a</think><answer>3</answer><opinion>increase</opinion>", "<answer>3</answer>"]
    total, comps, _ = score(texts, [UNLABELLED] * 2, weights=(1.0, 0.25))
    assert set(comps) == {"accuracy", "format"}  # calibration needs groups of 3 or more
    assert set(score(texts + texts[:1], [UNLABELLED] * 3)[1]) == {"accuracy", "calibration", "format"}
    assert total == [1.0 * 1 + 0.25 * 1, 1.0 * 1 + 0.25 * 0]
    total, _, _ = score(texts, [UNLABELLED] * 2, funcs=("format",), weights=(2.0,))
    assert total == [2.0, 0.0]


def test_reward_names_accept_upstream_aliases_and_reject_unknown():
    assert rewards.canonical_reward_names(["pure_accuracy_reward", "format"]) == ["accuracy", "format"]
    with pytest.raises(ValueError, match="unknown reward"):
        rewards.canonical_reward_names(["cosine"])


def test_calibration_reward_by_hand():
    # group 1: gold 1; two samples chose 1, one chose 2, one is unparseable (G - 2 = 2)
    # group 2: gold 3; two unparseable samples penalise each other, one chose 3
    choices = [1, 1, 2, None, None, None, 3, 1]
    golds = [1] * 4 + [3] * 4
    got = rewards.calibration_rewards(choices, golds, num_generations=4)
    assert got == pytest.approx([1 - 1 / 2, 1 - 1 / 2, 0.0, 0.0, -1 / 2, -1 / 2, 1.0, 0.0])


def test_calibration_advantage_expectation_is_proportional_to_q_minus_p():
    """With the group mean subtracted (GRPO), E[A | a = k] = (G-1)/G (q_k - p_k) + c: estimated by
    simulation, the differences between outcomes match, so the fixed point is p = q."""
    import random

    rng = random.Random(0)
    p, q, G = [0.6, 0.3, 0.1], [0.2, 0.5, 0.3], 6
    totals, counts = [0.0] * 3, [0] * 3
    for _ in range(20000):
        choices = rng.choices([1, 2, 3], weights=p, k=G)
        gold = rng.choices([1, 2, 3], weights=q)[0]
        values = rewards.calibration_rewards(choices, [gold] * G, G)
        mean = sum(values) / G
        for choice, r in zip(choices, values):
            totals[choice - 1] += r - mean
            counts[choice - 1] += 1
    advantage = [t / c for t, c in zip(totals, counts)]
    want = [(G - 1) / G * (b - a) for a, b in zip(p, q)]
    for k in (1, 2):  # the constant c cancels in differences
        assert advantage[k] - advantage[0] == pytest.approx(want[k] - want[0], abs=0.01)
