"""opinions.py: the opinion's scores by hand, the direction prior per participant and issue, the
pre-study-index logistic against a known relation, and the metrics on rows without labels."""
import math
import random

import pytest
import torch

import opinions

LABELS = ("increase", "decrease", "no_change")


def person(key, label, issue="gun_control", before=None, study="study1"):
    return {"participant_key": key, "opinion_direction": label, "issue": issue, "opinion_before": before,
            "participant_study": study}


def test_scores_by_hand_per_row_and_per_participant():
    rows = [person("a", "increase"), person("a", "increase"), person("b", "decrease")]
    dists = [[0.5, 0.25, 0.25], [0.8, 0.1, 0.0], [0.2, 0.6, 0.2]]  # the second has 0.1 invalid mass
    got = opinions.opinion_scores(rows, dists)
    a = (-math.log(0.5) - math.log(0.8)) / 2
    assert got["logloss"] == pytest.approx((-math.log(0.5) - math.log(0.8) - math.log(0.6)) / 3)
    assert got["participant_logloss"] == pytest.approx((a - math.log(0.6)) / 2) and got["participants"] == 2
    q = [0.8 / 0.9, 0.1 / 0.9, 0.0]
    brier = [0.25 + 0.0625 * 2, (q[0] - 1) ** 2 + q[1] ** 2, 0.04 + 0.16 + 0.04]
    assert got["brier"] == pytest.approx(sum(brier) / 3)
    assert got["valid_mass"] == pytest.approx(2.9 / 3)
    assert got["human_shares"] == pytest.approx({"increase": 2 / 3, "decrease": 1 / 3, "no_change": 0.0})
    assert got["shares"]["increase"] == pytest.approx((0.5 + q[0] + 0.2) / 3)
    assert got["accuracy"] == pytest.approx(1.0)
    sd = lambda xs: math.sqrt(sum((x - sum(xs) / 3) ** 2 for x in xs) / 3)
    assert got["spread"] == pytest.approx((sd([0.5, q[0], 0.2]) + sd([0.25, q[1], 0.6]) + sd([0.25, 0.0, 0.2])) / 3)
    assert opinions.row_spread([[0.7, 0.2, 0.1]] * 4) == pytest.approx(0.0, abs=1e-12)  # the prior's, in one issue
    assert opinions.row_spread([[1, 0, 0], [0, 1, 0]]) == pytest.approx((0.5 + 0.5 + 0) / 3)


def test_a_tied_mode_earns_a_random_tie_breaks_credit():
    """Think mode with no sample parsed: the estimate is uniform, favours no direction, and earns a
    third, not the full credit of the first direction."""
    rows = [person("a", "increase"), person("b", "decrease")]
    uniform = opinions.sampled_distribution([None] * 4)
    assert opinions.opinion_scores(rows, [uniform, uniform])["accuracy"] == pytest.approx(1 / 3)
    assert opinions.opinion_scores(rows, [[0.4, 0.4, 0.1], [0.4, 0.4, 0.1]])["accuracy"] == pytest.approx(0.5)


def test_direction_prior_counts_each_training_participant_once_per_issue():
    train = [person("a", "increase")] * 5 + [person("b", "decrease"), person("c", "no_change", "minimum_wage")]
    prior = opinions.direction_prior(train)
    assert prior({"issue": "gun_control"}) == pytest.approx([1.5 / 3.5, 1.5 / 3.5, 0.5 / 3.5])  # a once, not 5 times
    assert prior({"issue": "minimum_wage"}) == pytest.approx([0.5 / 2.5, 0.5 / 2.5, 1.5 / 2.5])
    assert prior({"issue": "abortion"}) == pytest.approx([1.5 / 4.5, 1.5 / 4.5, 1.5 / 4.5])  # every issue's


def test_index_logistic_recovers_a_known_relation():
    """Participants who start low move up: drawn from a softmax linear in the index, the fit's
    probabilities are close to the true ones and beat the prior's log-loss on fresh draws."""
    rng = random.Random(0)

    def truth(x):
        return torch.softmax(torch.tensor([3.0 - 6.0 * x, -3.0 + 6.0 * x, -1.0]), 0).tolist()

    def draw(n, prefix):
        out = []
        for i in range(n):
            x = rng.random()
            out.append(person(f"{prefix}{i}", rng.choices(LABELS, weights=truth(x))[0], before=x))
        return out

    train, held_out = draw(400, "t"), draw(400, "h")
    baseline, prior = opinions.index_baseline(train), opinions.direction_prior(train)
    for x in (0.1, 0.5, 0.9):
        assert baseline(person("z", None, before=x)) == pytest.approx(truth(x), abs=0.06)
    fit = opinions.opinion_scores(held_out, [baseline(r) for r in held_out])["logloss"]
    assert fit < opinions.opinion_scores(held_out, [prior(r) for r in held_out])["logloss"] - 0.2
    assert baseline(person("z", None, before=None)) == pytest.approx(prior({"issue": "gun_control"}))


def test_viewpoint_table_by_hand():
    """Each training participant votes once for their (issue, viewpoint); VIEWPOINT_STRENGTH x the
    issue's prior is added; an unseen viewpoint gets the prior itself."""
    def said(key, label, viewpoint, issue="gun_control"):
        return {**person(key, label, issue), "initial_viewpoint": viewpoint}

    train = [said("a", "increase", "Opposes")] * 3 + [said("b", "increase", "Opposes"),
                                                      said("c", "decrease", "Supports"), said("d", None, "Supports")]
    prior = opinions.direction_prior(train)({"issue": "gun_control"})
    assert prior == pytest.approx([2.5 / 4.5, 1.5 / 4.5, 0.5 / 4.5])
    table, k = opinions.viewpoint_baseline(train), opinions.VIEWPOINT_STRENGTH
    want = [2 + k * prior[0], k * prior[1], k * prior[2]]
    assert table(said("z", None, "Opposes")) == pytest.approx([w / (2 + k) for w in want])
    want = [k * prior[0], 1 + k * prior[1], k * prior[2]]
    assert table(said("z", None, "Supports")) == pytest.approx([w / (1 + k) for w in want])
    assert table(said("z", None, "Undecided")) == pytest.approx(prior)
    assert table(said("z", None, "Opposes", "minimum_wage")) == pytest.approx(  # the other issue's: prior only
        opinions.direction_prior(train)({"issue": "minimum_wage"}))


def test_metrics_skip_unlabelled_rows_and_stand_beside_every_baseline():
    train = [person(f"t{i}", LABELS[i % 2], before=0.1 + 0.8 * (i % 2)) for i in range(20)]
    rows = [person("a", "increase", before=0.1), person("b", None), person("c", "decrease", "minimum_wage", 0.9, "study2")]
    dists = [[0.7, 0.2, 0.1], [0.3, 0.3, 0.3], [0.2, 0.7, 0.1]]
    got = opinions.opinion_metrics(rows, dists, train, "exact")
    assert got["model"]["n"] == 2 and got["method"] == "exact"
    assert got["uniform"]["logloss"] == pytest.approx(math.log(3))
    assert got["no_change_accuracy"] == 0.0
    assert set(got["by_issue"]) == {"gun_control", "minimum_wage"}
    assert got["pooled_issues"] == ["minimum_wage"]  # no training participant: its baselines are pooled
    wage = got["by_issue"]["minimum_wage"]
    assert wage["prior"]["logloss"] == wage["viewpoint"]["logloss"] == wage["baseline"]["logloss"]
    assert set(got["by_group"]) == {"gun_control / study1", "minimum_wage / study2"}
    assert sum(cell["n"] for cell in got["calibration"]) == 6  # 2 labelled rows x 3 directions
    keys = opinions.headline_keys(got)
    assert keys["opinion_logloss"] == got["model"]["logloss"] and keys["opinion_baseline_logloss"] < math.log(3)
    assert keys["opinion_viewpoint_logloss"] == got["viewpoint"]["logloss"]
    assert opinions.opinion_metrics([person("b", None)], [[0.3] * 3], train, "exact") is None


def test_sampled_distribution_is_smoothed_over_directions_and_invalid():
    got = opinions.sampled_distribution(["increase", "increase", None, "no_change"])
    assert got == pytest.approx([2.5 / 6, 0.5 / 6, 1.5 / 6])
