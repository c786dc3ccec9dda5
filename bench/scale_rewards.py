"""Whether each advantage scaling keeps the calibration reward proper: with the policy already at the
humans' distribution q, every option's expected advantage E[A | a = k] must be equal (no update moves
p off q). Monte Carlo through the project's own reward and advantage code (rewards.py, grpo.py); a
script, not a test (about 4 s).

    python -m bench.scale_rewards [--draws=4000] [--seed=0]   # from the repository root

It prints E[A | k] / std(A) per option and the gap between the largest and the smallest: `none`
is exact (the gap is Monte-Carlo noise), the batch std tilts toward the mode at small batches.
"""
import random
import sys

import torch

import errors
import grpo
import rewards
from bench.steps import parse_options

Q = (0.5, 0.3, 0.15, 0.05)  # the humans' click shares (tests/test_bandit.py's bandit too)
SETTINGS = (("none", 2), ("batch", 2), ("batch", 8), ("batch", 32))


def expected_advantage_at_q(scale, prompts, G=8, draws=4000, seed=0):
    """E[A_i | a_i = k] / std(A) for each option k, by Monte Carlo, when the policy samples the humans'
    Q: the project's calibration reward and group advantages."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    sums, counts, squares = torch.zeros(len(Q)), torch.zeros(len(Q)), 0.0
    for _ in range(draws):
        choices = torch.multinomial(torch.tensor(Q), prompts * G, replacement=True, generator=gen) + 1
        golds = [gold for gold in rng.choices(range(1, len(Q) + 1), weights=Q, k=prompts) for _ in range(G)]
        values = torch.tensor(rewards.calibration_rewards(choices.tolist(), golds, G)).view(prompts, G)
        advantages = grpo.group_advantages(values, scale, 1e-4).view(-1).float()
        sums.index_add_(0, choices - 1, advantages)
        counts.index_add_(0, choices - 1, torch.ones(prompts * G))
        squares += float((advantages ** 2).sum())
    return sums / counts / (squares / (draws * prompts * G)) ** 0.5


def run(args):
    print(f"E[A | k] / std(A) at p = q = {Q}, G = 8, {args['draws']} draws (seed {args['seed']}):")
    for scale, prompts in SETTINGS:
        mean = expected_advantage_at_q(scale, prompts, draws=args["draws"], seed=args["seed"])
        print(f"  {scale:5} at {prompts:2} prompts a step: {' '.join(f'{m:+.3f}' for m in mean.tolist())}"
              f"   gap {(mean.max() - mean.min()).item():.3f}")


if __name__ == "__main__":
    errors.run(lambda argv: run(parse_options(argv, {"draws": 4000, "seed": 0})), sys.argv[1:])
