"""The GRPO formulas against plain, loop-by-loop reference implementations."""
import math

import pytest
import torch

import train_grail as tg


def reference_advantages(rewards, scale, floor):
    out = []
    flat = [r for group in rewards for r in group]
    batch_mean = sum(flat) / len(flat)
    batch_std = math.sqrt(sum((r - batch_mean) ** 2 for r in flat) / (len(flat) - 1))
    for group in rewards:
        mean = sum(group) / len(group)
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (len(group) - 1))
        divisor = {"group": max(std, floor), "batch": max(batch_std, floor), "none": 1.0}[scale]
        out.append([(r - mean) / divisor for r in group])
    return out


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_reference(scale):
    torch.manual_seed(0)
    rewards = torch.rand(5, 4).round(decimals=1)
    rewards[2] = 0.7  # a zero-spread group
    got = tg.group_advantages(rewards, scale, 1e-4)
    want = torch.tensor(reference_advantages(rewards.tolist(), scale, 1e-4))
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.all(got[2] == 0) and torch.isfinite(got).all()


def reference_loss(logp, old, ref, adv, mask, eps_lo, eps_hi, beta, loss_type, max_len):
    """Scalar torch ops in Python loops, so autograd gives the reference gradient too."""
    per_seq, total, tokens = [], 0.0, 0
    for i in range(logp.shape[0]):
        seq = []
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            ratio = torch.exp(logp[i, t] - old[i, t])
            clipped = torch.clamp(ratio, 1 - eps_lo, 1 + eps_hi)
            token = -torch.minimum(ratio * adv[i], clipped * adv[i])
            if beta:
                d = ref[i, t] - logp[i, t]
                token = token + beta * (torch.exp(d) - d - 1)
            seq.append(token)
        per_seq.append(sum(seq) / len(seq))
        total = total + sum(seq)
        tokens += len(seq)
    if loss_type == "grpo":
        return sum(per_seq) / len(per_seq)
    if loss_type == "dr_grpo":
        return total / (logp.shape[0] * max_len)
    return total / tokens


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_match_reference(loss_type, beta):
    torch.manual_seed(1)
    N, C, max_len = 6, 7, 9
    logp = (torch.randn(N, C) * 0.3 - 1).requires_grad_()
    old = (logp.detach() + torch.randn(N, C) * 0.3)
    ref = logp.detach() + torch.randn(N, C) * 0.2
    adv = torch.randn(N)
    lengths = torch.tensor([7, 3, 1, 5, 7, 2])
    mask = (torch.arange(C)[None] < lengths[:, None]).long()

    token_loss, kl, _ = tg.per_token_loss(logp, old, ref, adv, 0.2, 0.28, beta)
    ours = tg.loss_numerator(token_loss, mask, loss_type) / tg.loss_normaliser(loss_type, mask, max_len)
    (grad_ours,) = torch.autograd.grad(ours, logp)
    want = reference_loss(logp, old, ref, adv, mask, 0.2, 0.28, beta, loss_type, max_len)
    (grad_want,) = torch.autograd.grad(want, logp)
    assert torch.allclose(ours, want, atol=1e-6)
    assert torch.allclose(grad_ours, grad_want, atol=1e-6)
    assert (kl is None) == (beta == 0)


def test_clipping_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    old = torch.zeros(1, 3)
    loss, _, clipped = tg.per_token_loss(logp, old, None, torch.tensor([1.0]), 0.2, 0.3, 0.0)
    # A > 0: ratio 1.5 is clipped at 1.3; ratio 0.5 is not (min keeps the pessimistic 0.5).
    assert torch.allclose(loss, torch.tensor([[-1.3, -0.5, -1.1]]))
    assert clipped.tolist() == [[True, False, False]]
    loss, _, clipped = tg.per_token_loss(logp, old, None, torch.tensor([-1.0]), 0.2, 0.3, 0.0)
    # A < 0: ratio 0.5 is clipped at 0.8 (objective -0.8); ratio 1.5 is kept.
    assert torch.allclose(loss, torch.tensor([[1.5, 0.8, 1.1]]))
    assert clipped.tolist() == [[False, True, False]]


def test_k3_kl_by_hand():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.0, -1.0]])
    _, kl, _ = tg.per_token_loss(logp, logp, ref, torch.zeros(1), 0.2, 0.2, 1.0)
    assert torch.allclose(kl, torch.tensor([[0.0, math.exp(1) - 1 - 1]]))


def test_selective_log_softmax_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    ids = torch.randint(0, 11, (3, 5))
    want = logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(tg.selective_log_softmax(logits, ids), want, atol=1e-6)


def test_micro_batches_keep_groups_together():
    batch = {"prompt_ids": torch.arange(3)[:, None], "prompt_mask": torch.ones(3, 1), "completion_ids": torch.arange(12)}
    chunks = list(tg.micro_batches(batch, n_micro=2))
    assert len(chunks) == 2
    for chunk in chunks:  # each chunk holds whole groups: rows 4p..4p+3 of its prompts p
        want = [4 * p + j for p in chunk["prompt_ids"].flatten().tolist() for j in range(4)]
        assert chunk["completion_ids"].tolist() == want
    assert torch.cat([c["completion_ids"] for c in chunks]).tolist() == list(range(12))


def test_lr_schedule_warmup_then_cosine():
    cfg = tg.Config(max_steps=10, warmup_ratio=0.2, learning_rate=1.0)
    model = torch.nn.Linear(2, 2)
    opt, sched = tg.make_optimizer(model, cfg)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] < 0.05
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
