"""The calibration reward trains a simulator, the accuracy reward collapses one: a tabular softmax
policy over 4 options, humans choosing with q, trained with the project's own GRPO advantage, loss
and normaliser (grpo.py) and optimizer schedule (batch-scaled advantages, as check_config requires
for calibration)."""
import random

import pytest
import torch

import grpo
import rewards
import train_grail as tg

Q = (0.5, 0.3, 0.15, 0.05)


def train_bandit(reward, scale="batch", steps=300, prompts=16, G=8, seed=0):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    logits = torch.nn.Parameter(torch.zeros(len(Q)))
    cfg = tg.Config(learning_rate=0.05, max_steps=steps, warmup_ratio=0.0, loss_type="dapo")
    optimizer, scheduler = grpo.make_optimizer(torch.nn.ParameterList([logits]), cfg)
    for _ in range(steps):
        with torch.no_grad():
            choices = torch.multinomial(torch.softmax(logits, 0), prompts * G, replacement=True) + 1
        golds = [gold for gold in rng.choices(range(1, len(Q) + 1), weights=Q, k=prompts) for _ in range(G)]
        if reward == "calibration":
            values = rewards.calibration_rewards(choices.tolist(), golds, G)
        else:
            values = [float(c == g) for c, g in zip(choices.tolist(), golds)]
        advantages = grpo.group_advantages(torch.tensor(values).view(prompts, G), scale, 1e-4).view(-1)
        logp = torch.log_softmax(logits, 0)[choices - 1].unsqueeze(1)  # one token per completion
        mask = torch.ones_like(logp, dtype=torch.long)
        token_loss, _, _ = grpo.per_token_loss(logp, logp.detach(), None, advantages, 0.2, 0.2, 0.0)
        loss = grpo.loss_numerator(token_loss, mask, "dapo") / grpo.loss_normaliser("dapo", mask, 1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
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
