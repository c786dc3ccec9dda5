"""Which rewards train a simulator, on a tabular bandit: one state, 4 options, humans choosing with
q; a softmax policy trained with the project's own GRPO advantage, loss and normaliser (grpo.py) and
optimizer schedule. The calibration reward learns q, the accuracy reward collapses onto its mode.
With GAIL, a tabular discriminator (one logit per option) goes through the project's own
DiscriminatorTrainer (human pairs against a replay buffer of the policy's choices, its reward form)
and rewards.mix_disc: the adversarial game alone, and mixed with calibration, learns q; mixed with
accuracy at upstream's weights it collapses."""
import random

import pytest
import torch

import disc
import grpo
import rewards
import train_grail as tg
from bench.scale_rewards import Q, expected_advantage_at_q  # the humans' click shares



class TabularDiscriminator(torch.nn.Module):
    """disc.Discriminator's interface with one logit per option, the same in every state."""

    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(len(Q)))

    def encode_rows(self, rows):
        return len(rows)

    def score_table(self, n_rows, state_embeds=None):
        return self.logits.expand(n_rows, -1)

    def forward(self, rows):
        return self.score_table(self.encode_rows(rows))


def train_bandit(reward, scale="batch", steps=300, prompts=16, G=8, seed=0, gail=None, gail_weight=0.5,
                 disc_steps=4, gail_reward="prob"):
    """reward: accuracy | calibration | None (the discriminator's reward alone); gail: mix in the
    discriminator's reward. Returns the final policy."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    slate = [{"title": f"video {k}"} for k in range(1, len(Q) + 1)]
    rows = [{"gold_index": gold, "n_options": len(Q), "slate_items_json": slate}
            for gold in rng.choices(range(1, len(Q) + 1), weights=Q, k=512)]  # the humans' clicks
    logits = torch.nn.Parameter(torch.zeros(len(Q)))
    cfg = tg.Config(learning_rate=0.05, max_steps=steps, warmup_ratio=0.0, loss_type="dapo", seed=seed,
                    gail_lr=0.05, gail_reward=gail_reward)
    optimizer, scheduler = grpo.make_optimizer(torch.nn.ParameterList([logits]), cfg)
    trainer = disc.DiscriminatorTrainer(TabularDiscriminator(), rows, cfg, rank=0) if gail else None
    for _ in range(steps):
        indices = [rng.randrange(len(rows)) for _ in range(prompts)]
        with torch.no_grad():
            choices = (torch.multinomial(torch.softmax(logits, 0), prompts * G, replacement=True) + 1).tolist()
        golds = [rows[i]["gold_index"] for i in indices for _ in range(G)]
        if reward == "calibration":
            values = rewards.calibration_rewards(choices, golds, G)
        else:
            values = [float(c == g) for c, g in zip(choices, golds)]
        if trainer is not None:  # scored by D as it is before this step's updates, as the trainer does
            d_rewards, _ = trainer.policy_rewards([rows[i] for i in indices], indices, choices, G)
            values = d_rewards if reward is None else rewards.mix_disc(values, d_rewards, gail_weight)
        logp = torch.log_softmax(logits, 0)[torch.tensor(choices) - 1].unsqueeze(1)  # one token per completion
        grpo_step(logp, values, prompts, G, scale, optimizer, scheduler)
        for _ in range(disc_steps if trainer else 0):
            trainer.step()
    return torch.softmax(logits.detach(), 0)


def grpo_step(logp, values, prompts, G, scale, optimizer, scheduler):
    """One update through the project's group advantages, clipped per-token loss and normaliser."""
    advantages = grpo.group_advantages(torch.tensor(values).view(prompts, G), scale, 1e-4).view(-1)
    mask = torch.ones_like(logp, dtype=torch.long)
    token_loss, _, _ = grpo.per_token_loss(logp, logp.detach(), None, advantages, 0.2, 0.2, 0.0)
    loss = grpo.loss_numerator(token_loss, mask, "dapo") / grpo.loss_normaliser("dapo", mask, 1)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()


def tvd(p):
    return 0.5 * sum(abs(a - b) for a, b in zip(p.tolist(), Q))


@pytest.mark.parametrize("seed, scale", [(0, "batch"), (1, "batch"), (2, "none")])
def test_calibration_reward_learns_the_human_distribution(seed, scale):
    assert tvd(train_bandit("calibration", scale, seed=seed)) < 0.05


def test_group_std_scaling_biases_calibration_toward_the_mode():
    """Why check_config refuses calibration with scale_rewards=group."""
    p = train_bandit("calibration", "group")
    assert tvd(p) > 0.1 and p[0] > 0.6


@pytest.mark.parametrize("scale, prompts", [("none", 2), ("batch", 8), ("batch", 32)])
def test_calibration_advantage_is_flat_at_the_human_distribution(scale, prompts):
    mean = expected_advantage_at_q(scale, prompts)
    assert (mean.max() - mean.min()).item() < 0.05  # Monte-Carlo noise here is about 0.015


def test_batch_std_of_a_small_batch_tilts_calibration_toward_the_mode():
    """Why the trainer warns below 16 prompts a step with scale_rewards=batch: the batch's std holds
    the sample's own reward, so at B = 2 the mode's expected advantage stands above every other's."""
    mean = expected_advantage_at_q("batch", 2)
    assert (mean.max() - mean.min()).item() > 0.08 and mean.argmax().item() == 0 and (mean[1:] < 0).all()


def test_accuracy_reward_collapses_onto_the_mode():
    p = train_bandit("accuracy", "group")
    assert tvd(p) > 0.4 and p.argmax().item() == 0


# --- GAIL: the discriminator's reward is proper while D keeps up; accuracy mixed in is not ---


@pytest.mark.parametrize("seed, form", [(0, "prob"), (1, "logit")])
def test_discriminator_reward_alone_learns_the_human_distribution(seed, form):
    assert tvd(train_bandit(None, gail=True, seed=seed, gail_reward=form)) < 0.05


@pytest.mark.parametrize("seed", [0, 1])
def test_calibration_with_the_discriminator_learns_the_human_distribution(seed):
    """GRAIL proper: calibration + GAIL_WEIGHT 0.5 x D, batch-scaled advantages (the recipes' mix)."""
    assert tvd(train_bandit("calibration", gail=True, seed=seed)) < 0.05


def test_accuracy_with_the_discriminator_collapses():
    """GRAIL as upstream: accuracy + 0.5 x D (prob), group-scaled. D's bounded reward cannot hold
    the policy against a base reward whose optimum is a point mass."""
    p = train_bandit("accuracy", "group", gail=True)
    assert tvd(p) > 0.2 and p[0] > 0.7


# --- the opinion: the same rule on the opinion, averaged with the click's (rewards.score) ---

OPINION_Q = {"left": (0.7, 0.2, 0.1), "right": (0.15, 0.75, 0.1)}  # who the viewer is sets the opinion


def train_joint_bandit(reward, scale="batch", steps=600, prompts=32, G=8, seed=0):
    """Two kinds of viewer, each a state of a tabular policy over (click, opinion) pairs; the humans'
    click is drawn from Q and their opinion from their kind's OPINION_Q, independently. Rewards come
    from rewards.score on the sampled pairs. Returns {kind: (click marginal, opinion marginal)}."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    kinds, labels = sorted(OPINION_Q), rewards.OPINION_LABELS
    rows = [{"kind": kind, "gold_index": rng.choices(range(1, len(Q) + 1), weights=Q)[0], "n_options": len(Q),
             "opinion_direction": rng.choices(labels, weights=OPINION_Q[kind])[0]}
            for kind in kinds for _ in range(256)]
    logits = torch.nn.Parameter(torch.zeros(len(kinds), len(Q) * len(labels)))
    cfg = tg.Config(learning_rate=0.05, max_steps=steps, warmup_ratio=0.0, loss_type="dapo", seed=seed)
    optimizer, scheduler = grpo.make_optimizer(torch.nn.ParameterList([logits]), cfg)
    for _ in range(steps):
        batch = [rows[rng.randrange(len(rows))] for _ in range(prompts)]
        states = torch.tensor([kinds.index(row["kind"]) for row in batch]).repeat_interleave(G)
        with torch.no_grad():
            pairs = torch.multinomial(torch.softmax(logits[states], -1), 1).squeeze(1)
        parsed = [rewards.Parsed(int(p) // len(labels) + 1, "parsed", True, labels[int(p) % len(labels)])
                  for p in pairs]
        values, _, _ = rewards.score(parsed, [row for row in batch for _ in range(G)], [reward], [1.0], G)
        logp = torch.log_softmax(logits[states], -1).gather(1, pairs[:, None])  # one token per completion
        grpo_step(logp, values, prompts, G, scale, optimizer, scheduler)
    joint = torch.softmax(logits.detach(), -1).view(len(kinds), len(Q), len(labels))
    return {kind: (joint[i].sum(1), joint[i].sum(0), shares(rows, kind, "gold_index", range(1, len(Q) + 1)),
                   shares(rows, kind, "opinion_direction", labels)) for i, kind in enumerate(kinds)}


def shares(rows, kind, key, outcomes):
    """The shares of `key`'s outcomes among the kind's rows: the distribution its sampled humans have."""
    mine = [row[key] for row in rows if row["kind"] == kind]
    return [mine.count(outcome) / len(mine) for outcome in outcomes]


def tvd_to(p, q):
    return 0.5 * sum(abs(a - b) for a, b in zip(p.tolist(), q))


@pytest.mark.parametrize("seed", [0, 1])
def test_calibration_learns_each_viewers_opinion_and_the_click(seed):
    for kind, (click, opinion, clicks, opinions) in train_joint_bandit("calibration", seed=seed).items():
        assert tvd_to(click, clicks) < 0.05 and tvd_to(opinion, opinions) < 0.05, (kind, click, clicks, opinion, opinions)


def test_accuracy_collapses_the_opinion_onto_each_viewers_mode():
    for kind, (_, opinion, _, _) in train_joint_bandit("accuracy", "group").items():
        assert opinion.max() > 0.95 and opinion.argmax().item() == max(range(3), key=OPINION_Q[kind].__getitem__)
