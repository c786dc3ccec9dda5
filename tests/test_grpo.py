"""grpo.py: the GRPO formulas against plain, loop-by-loop reference implementations, and the
shared-prefix training forward against the naive one (each prompt computed G times)."""
import math

import pytest
import torch

import checkpoint
import choices
import data
import grpo
import opinions
import prompts
import rollout
import schema
import tiny
import train_grail as tg
from tiny import random_batch, real_prompts

CPU = torch.device("cpu")


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
    got = grpo.group_advantages(rewards, scale, 1e-4)
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

    token_loss, kl, _ = grpo.per_token_loss(logp, old, ref, adv, 0.2, 0.28, beta)
    ours = grpo.loss_numerator(token_loss, mask, loss_type) / grpo.loss_normaliser(loss_type, mask, max_len)
    (grad_ours,) = torch.autograd.grad(ours, logp)
    want = reference_loss(logp, old, ref, adv, mask, 0.2, 0.28, beta, loss_type, max_len)
    (grad_want,) = torch.autograd.grad(want, logp)
    assert torch.allclose(ours, want, atol=1e-6)
    assert torch.allclose(grad_ours, grad_want, atol=1e-6)
    assert (kl is None) == (beta == 0)


def test_clipping_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    old = torch.zeros(1, 3)
    loss, _, clipped = grpo.per_token_loss(logp, old, None, torch.tensor([1.0]), 0.2, 0.3, 0.0)
    # A > 0: ratio 1.5 is clipped at 1.3; ratio 0.5 is not (min keeps the pessimistic 0.5).
    assert torch.allclose(loss, torch.tensor([[-1.3, -0.5, -1.1]]))
    assert clipped.tolist() == [[True, False, False]]
    loss, _, clipped = grpo.per_token_loss(logp, old, None, torch.tensor([-1.0]), 0.2, 0.3, 0.0)
    # A < 0: ratio 0.5 is clipped at 0.8 (objective -0.8); ratio 1.5 is kept.
    assert torch.allclose(loss, torch.tensor([[1.5, 0.8, 1.1]]))
    assert clipped.tolist() == [[False, True, False]]


def test_k3_kl_by_hand():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.0, -1.0]])
    _, kl, _ = grpo.per_token_loss(logp, logp, ref, torch.zeros(1), 0.2, 0.2, 1.0)
    assert torch.allclose(kl, torch.tensor([[0.0, math.exp(1) - 1 - 1]]))


def test_selective_log_softmax_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    ids = torch.randint(0, 11, (3, 5))
    want = logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(grpo.selective_log_softmax(logits, ids), want, atol=1e-6)


def test_micro_batches_keep_groups_together():
    batch = {"prompt_ids": torch.arange(3)[:, None], "prompt_mask": torch.ones(3, 1), "completion_ids": torch.arange(12)}
    chunks = list(grpo.micro_batches(batch, n_micro=2))
    assert len(chunks) == 2
    for chunk in chunks:  # each chunk holds whole groups: rows 4p..4p+3 of its prompts p
        want = [4 * p + j for p in chunk["prompt_ids"].flatten().tolist() for j in range(4)]
        assert chunk["completion_ids"].tolist() == want
    assert torch.cat([c["completion_ids"] for c in chunks]).tolist() == list(range(12))


def test_advantage_one_at_ratio_one_is_the_likelihood_gradient():
    """Behaviour cloning reuses the update: with advantage 1 and old = logp, the dapo loss has the
    gradient of the token-averaged negative log-likelihood."""
    torch.manual_seed(0)
    logp = (torch.randn(4, 5) - 2).requires_grad_()
    mask = (torch.arange(5)[None] < torch.tensor([5, 3, 1, 4])[:, None]).long()
    token_loss, _, clipped = grpo.per_token_loss(logp, logp.detach(), None, torch.ones(4), 0.2, 0.2, 0.0)
    loss = grpo.loss_numerator(token_loss, mask, "dapo") / grpo.loss_normaliser("dapo", mask, 5)
    nll = -(logp * mask).sum() / mask.sum()
    assert torch.allclose(torch.autograd.grad(loss, logp)[0], torch.autograd.grad(nll, logp)[0])
    assert not clipped.any()


def test_cloning_targets_mix_the_click_and_the_opinion_with_their_priors(bundled, tiny_model_dir):
    tokenizer = checkpoint.load_tokenizer(tiny_model_dir)
    train_rows, _ = data.load_examples("", 0.1, 0, log=lambda msg: None)
    prior, direction_prior = choices.position_prior(train_rows), opinions.direction_prior(train_rows)
    row = next(r for r in train_rows if r["n_options"] >= 4 and r["opinion_direction"] == "decrease")
    gold, end = row["gold_index"], 7

    def decoded(targets):
        return [(tokenizer.decode(ids), w, tokenizer.decode(ids[start:])) for ids, w, start in targets]

    assert decoded(choices.cloning_targets(tokenizer, row, prior, 0.0, direction_prior, 0.0, end)) == [
        (f"{gold}</answer>", 1.0, f"{gold}</answer>"),
        (f"{gold}</answer><opinion>decrease</opinion>{tokenizer.decode([end])}", 1.0,
         f"<opinion>decrease</opinion>{tokenizer.decode([end])}")]
    targets = decoded(choices.cloning_targets(tokenizer, row, prior, 0.3, direction_prior, 0.4, end))
    clicks, views = targets[:row["n_options"]], targets[row["n_options"]:]
    assert [text for text, _, _ in clicks] == [f"{k}</answer>" for k in range(1, row["n_options"] + 1)]
    for k, (_, w, _) in enumerate(clicks, 1):
        assert w == pytest.approx(0.7 * (k == gold) + 0.3 * prior(row["n_options"])[k - 1])
    assert [text for text, _, _ in views] == [f"{gold}</answer><opinion>{d}</opinion>{tokenizer.decode([end])}"
                                             for d in schema.OPINION_LABELS]
    for d, (_, w, _) in zip(schema.OPINION_LABELS, views):
        assert w == pytest.approx(0.6 * (d == "decrease") + 0.4 * direction_prior(row)[schema.OPINION_LABELS.index(d)])
    assert sum(w for _, w, _ in clicks) == pytest.approx(1.0) and sum(w for _, w, _ in views) == pytest.approx(1.0)
    unlabelled = dict(row, opinion_direction=None)
    assert len(choices.cloning_targets(tokenizer, unlabelled, prior, 0.3, direction_prior, 0.4, end)) == row["n_options"]


def test_smoothed_cloning_batch_has_the_cross_entropy_gradient(tiny_model_dir):
    """Each prompt's completions are its targets (the shorter list padded with weight-0 copies), each
    token's advantage its target's weight from the target's first scored token on; the update's loss
    then has the gradient of -sum_rows sum_targets w sum_(scored tokens) log p, over the batch's
    normaliser, which the reference computes one full prompt + target sequence at a time."""
    model = checkpoint.load_model(tiny_model_dir, CPU, trainable=True)
    tokenizer = checkpoint.load_tokenizer(tiny_model_dir)
    train_rows, _ = data.load_examples("", 0.1, 0, log=lambda msg: None)
    prior, direction_prior = choices.position_prior(train_rows), opinions.direction_prior(train_rows)
    rows = [next(r for r in train_rows if r["n_options"] == 2 and r["opinion_direction"]),
            next(r for r in train_rows if r["n_options"] >= 4 and r["opinion_direction"])]
    texts = [prompts.PromptFormat("answer").text(tokenizer, r) for r in rows]
    end = rollout.stop_token_ids(model, tokenizer)[0]
    targets = [choices.cloning_targets(tokenizer, r, prior, 0.3, direction_prior, 0.5, end) for r in rows]
    batch = grpo.cloning_batch(tokenizer, texts, targets, end, CPU)
    width = rows[1]["n_options"] + 3
    assert batch["completion_ids"].shape[0] == 2 * width
    assert batch["advantages"][5:width].abs().sum() == 0  # the padding of the 2-option slate
    ids, weight, start = targets[0][2]  # the first opinion target: its click's tokens are not scored
    assert batch["advantages"][2, :start].abs().sum() == 0
    assert batch["advantages"][2, start:len(ids)].tolist() == pytest.approx([weight] * (len(ids) - start))

    params = [p for p in model.parameters() if p.requires_grad]
    logp = grpo.completion_logprobs(model, batch, 1.0)
    token_loss, _, _ = grpo.per_token_loss(logp, logp.detach(), None, batch["advantages"], 0.2, 0.2, 0.0)
    normaliser = grpo.loss_normaliser("dapo", batch["completion_mask"], 6)
    got = torch.autograd.grad(grpo.loss_numerator(token_loss, batch["completion_mask"], "dapo") / normaliser, params)

    cross_entropy = 0.0
    for text, row_targets in zip(texts, targets):
        prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
        for answer_ids, weight, start in row_targets:
            logits = model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0, len(prompt_ids) - 1:-1]
            token_logp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(answer_ids)[:, None])
            cross_entropy = cross_entropy - weight * token_logp[start:].sum()
    want = torch.autograd.grad(cross_entropy / normaliser, params)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-6, rtol=1e-4)


def test_lr_schedule_warmup_then_cosine():
    cfg = tg.Config(max_steps=10, warmup_ratio=0.2, learning_rate=1.0)
    model = torch.nn.Linear(2, 2)
    opt, sched = grpo.make_optimizer(model, cfg)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] < 0.05
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_cloning_warms_up_over_its_own_share_of_its_steps(monkeypatch):
    """The cloning's schedule: bc_learning_rate, warmed up over bc_warmup_ratio of bc_steps, then
    cosine to 0, whatever the GRPO schedule's keys (learning_rate, warmup_ratio) say."""
    import distributed

    seen = []

    def recorded_update(policy, optimizer, scheduler, batch, cfg, world):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        return {"weighted_logp_sum": -1.0}

    monkeypatch.setattr(grpo, "update", recorded_update)
    monkeypatch.setattr(grpo, "cloning_batch", lambda *args: None)
    monkeypatch.setattr(grpo.rollout, "stop_token_ids", lambda *args: [0])
    cfg = tg.Config(bc_steps=10, bc_learning_rate=2.0, bc_warmup_ratio=0.2, learning_rate=1.0, warmup_ratio=0.5)
    steps = grpo.behaviour_cloning(None, torch.nn.Linear(2, 2), None, [(["p"], [None])] * 10, cfg,
                                   distributed.single_process())
    assert seen[:3] == [1.0, 2.0, pytest.approx(2.0)] and seen[-1] < 0.1
    assert [(s["bc_step"], s["loss"], s["lr"]) for s in steps] == [(i + 1, 1.0, lr) for i, lr in enumerate(seen)]
    assert all(a >= b for a, b in zip(seen[1:], seen[2:]))
    seen.clear()
    grpo.behaviour_cloning(None, torch.nn.Linear(2, 2), None, [(["p"], [None])] * 10,
                           tg.Config(bc_steps=10, bc_learning_rate=2.0), distributed.single_process())
    assert seen[0] == 2.0  # no warm-up unless asked (the default 0)


# --- the shared-prefix training forward ---


def logprobs_and_grads(model, batch, shared):
    model.zero_grad()
    logp = grpo.completion_logprobs(model, batch, temperature=0.9, shared_prefix=shared)
    weights = torch.linspace(-1, 1, logp.numel()).view_as(logp)  # a loss that touches every token
    (logp * weights * batch["completion_mask"]).sum().backward()
    return logp.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same(model, batch, logp_tol, grad_rel_tol):
    naive, naive_grads = logprobs_and_grads(model, batch, shared=False)
    shared, shared_grads = logprobs_and_grads(model, batch, shared=True)
    mask = batch["completion_mask"].bool()
    assert (naive - shared)[mask].abs().max() <= logp_tol
    diff = torch.cat([(grad - shared_grads[name]).flatten() for name, grad in naive_grads.items()])
    full = torch.cat([grad.flatten() for grad in naive_grads.values()])
    assert diff.norm() / full.norm() <= grad_rel_tol  # relative error of the whole gradient
    for name, grad in naive_grads.items():  # and no single tensor far off (fp32 summation order)
        rel = (grad - shared_grads[name]).norm() / grad.norm().clamp_min(1e-12)
        assert rel <= 10 * grad_rel_tol, f"{name}: relative gradient difference {rel:.2e}"


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # a boolean tree mask, or an additive one
def test_training_forward_matches_naive_on_tiny_model(tiny_model_dir, attention):
    model = checkpoint.load_model(str(tiny_model_dir), CPU, trainable=True)
    model.set_attn_implementation(attention)
    assert model.config._attn_implementation == attention
    assert_same(model, random_batch(model.config.vocab_size), logp_tol=1e-5, grad_rel_tol=1e-5)


def test_training_forward_matches_naive_on_the_real_model(embedded_model_dir):
    model = checkpoint.load_model(embedded_model_dir, CPU, trainable=True)
    tokenizer = checkpoint.load_tokenizer(embedded_model_dir)
    prompts = real_prompts(tokenizer)
    prompt_ids, prompt_mask = rollout.encode_prompts(tokenizer, prompts, CPU)
    batch = random_batch(model.config.vocab_size, n_prompts=2, G=2, C=6)
    batch.update(prompt_ids=prompt_ids, prompt_mask=prompt_mask)
    assert prompt_mask[:, 0].tolist().count(0) == 1  # one prompt is left-padded
    assert_same(model, batch, logp_tol=1e-4, grad_rel_tol=1e-4)


def test_shared_prefix_under_activation_checkpointing_matches_naive(tiny_model_dir):
    model = checkpoint.load_model(str(tiny_model_dir), CPU, trainable=True)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert model.is_activation_checkpointing
    assert_same(model, random_batch(model.config.vocab_size), logp_tol=1e-5, grad_rel_tol=1e-5)


def test_each_prompt_and_completion_token_is_computed_once(tiny_model_dir):
    model = checkpoint.load_model(str(tiny_model_dir), CPU, trainable=True)
    batch = random_batch(model.config.vocab_size)
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].numel()))
    grpo.completion_logprobs(model, batch, temperature=1.0, shared_prefix=True)
    hook.remove()
    assert len(seen) == batch["prompt_ids"].shape[0]  # one model call per prompt
    assert sum(seen) == int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())  # no pads, no repeats


def test_window_shorter_than_the_sequence_falls_back_to_the_naive_forward(tmp_path):
    model = checkpoint.load_model(str(tiny.make_tiny_model(tmp_path, sliding_window=10)), CPU, trainable=True)
    batch = random_batch(model.config.vocab_size)  # prompts of 4-12 tokens, completions of up to 7
    assert_same(model, batch, logp_tol=1e-5, grad_rel_tol=1e-5)


def test_tree_mask_rejects_attention_without_4d_masks():
    with pytest.raises(ValueError, match="shared_prefix=false"):
        grpo.tree_attention_mask(5, torch.tensor([2, 3]), "flash_attention_2")


def test_tree_mask_by_hand():
    mask = grpo.tree_attention_mask(2, torch.tensor([2, 1]), "sdpa")[0, 0].int()
    assert mask.tolist() == [[1, 0, 0, 0, 0],   # prompt token 0
                             [1, 1, 0, 0, 0],   # prompt token 1
                             [1, 1, 1, 0, 0],   # completion 0, token 0
                             [1, 1, 1, 1, 0],   # completion 0, token 1
                             [1, 1, 0, 0, 1]]   # completion 1, token 0: not completion 0
    additive = grpo.tree_attention_mask(2, torch.tensor([2, 1]), "eager")[0, 0]
    assert torch.equal(additive == 0, mask.bool())


def test_window_longer_than_the_sequence_keeps_the_tree_mask(tmp_path):
    model = checkpoint.load_model(str(tiny.make_tiny_model(tmp_path, sliding_window=64)), CPU, trainable=True)
    assert_same(model, random_batch(model.config.vocab_size), logp_tol=1e-5, grad_rel_tol=1e-5)
