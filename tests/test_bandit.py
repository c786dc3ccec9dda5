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

Q = (0.5, 0.3, 0.15, 0.05)


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
        advantages = grpo.group_advantages(torch.tensor(values).view(prompts, G), scale, 1e-4).view(-1)
        logp = torch.log_softmax(logits, 0)[torch.tensor(choices) - 1].unsqueeze(1)  # one token per completion
        mask = torch.ones_like(logp, dtype=torch.long)
        token_loss, _, _ = grpo.per_token_loss(logp, logp.detach(), None, advantages, 0.2, 0.2, 0.0)
        loss = grpo.loss_numerator(token_loss, mask, "dapo") / grpo.loss_normaliser("dapo", mask, 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        for _ in range(disc_steps if trainer else 0):
            trainer.step()
    return torch.softmax(logits.detach(), 0)


def tvd(p):
    return 0.5 * sum(abs(a - b) for a, b in zip(p.tolist(), Q))


@pytest.mark.parametrize("seed, scale", [(0, "batch"), (1, "batch"), (2, "none")])
def test_calibration_reward_learns_the_human_distribution(seed, scale):
    assert tvd(train_bandit("calibration", scale, seed=seed)) < 0.05


def test_group_std_scaling_biases_calibration_toward_the_mode():
    """Why check_config refuses calibration with scale_rewards=group."""
    p = train_bandit("calibration", "group")
    assert tvd(p) > 0.1 and p[0] > 0.6


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
