"""Shared-prefix rollouts and training forward equal the naive ones (each prompt computed G times)."""
import pytest
import torch

import data
import rollout
import train_grail as tg

CPU = torch.device("cpu")


def random_batch(vocab, n_prompts=3, G=4, P=12, C=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (n_prompts, P), generator=gen)
    pad = torch.tensor([0, 5, 2, 8][:n_prompts])
    prompt_mask = (torch.arange(P)[None] >= pad[:, None]).long()
    completion_ids = torch.randint(3, vocab, (n_prompts * G, C), generator=gen)
    lengths = torch.randint(1, C + 1, (n_prompts * G,), generator=gen)
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask}


def logprobs_and_grads(model, batch, shared):
    model.zero_grad()
    logp = tg.completion_logprobs(model, batch, temperature=0.9, shared_prefix=shared)
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
    model = tg.load_model(str(tiny_model_dir), CPU, trainable=True)
    model.set_attn_implementation(attention)
    assert model.config._attn_implementation == attention
    assert_same(model, random_batch(model.config.vocab_size), logp_tol=1e-5, grad_rel_tol=1e-5)


def test_sliding_window_cache_takes_the_padded_batch_prefill(tmp_path):
    import tiny
    from transformers.cache_utils import DynamicLayer

    folder = str(tiny.make_tiny_model(tmp_path, sliding_window=64))
    model, tokenizer = tg.load_model(folder, CPU, trainable=True), tg.load_tokenizer(folder)
    batch = random_batch(model.config.vocab_size)
    cache = rollout.prompt_cache(model, batch["prompt_ids"], batch["prompt_mask"], 4)
    assert not all(type(layer) is DynamicLayer for layer in cache.layers)
    prompts = [chat(tokenizer, "VIEWER short"), chat(tokenizer, "OPTIONS 1. a much longer prompt " * 4)]
    outs = []
    for shared in (False, True):  # generation from that cache equals plain generate
        torch.manual_seed(5)
        outs.append(rollout.generate(model, tokenizer, prompts, 3, 12, shared_prefix=shared).completion_ids)
    assert torch.equal(outs[0], outs[1])
    assert_same(model, batch, logp_tol=1e-5, grad_rel_tol=1e-5)  # a window longer than the sequence


def real_prompts(tokenizer, n=2):
    """The first training rows' prompts in answer mode, as the default run renders them."""
    train_rows, _ = data.load_examples("", 0.1, 0, log=lambda msg: None)
    cfg = tg.Config(prompt_mode="answer")
    return [tg.prompt_text(tokenizer, row, cfg) for row in train_rows[:n]]


def test_training_forward_matches_naive_on_the_real_model(embedded_model_dir):
    model = tg.load_model(embedded_model_dir, CPU, trainable=True)
    tokenizer = tg.load_tokenizer(embedded_model_dir)
    prompts = real_prompts(tokenizer)
    prompt_ids, prompt_mask = rollout.encode_prompts(tokenizer, prompts, CPU)
    batch = random_batch(model.config.vocab_size, n_prompts=2, G=2, C=6)
    batch.update(prompt_ids=prompt_ids, prompt_mask=prompt_mask)
    assert prompt_mask[:, 0].tolist().count(0) == 1  # one prompt is left-padded
    assert_same(model, batch, logp_tol=1e-4, grad_rel_tol=1e-4)


def test_shared_prefix_under_activation_checkpointing_matches_naive(tiny_model_dir):
    model = tg.load_model(str(tiny_model_dir), CPU, trainable=True)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert model.is_activation_checkpointing
    assert_same(model, random_batch(model.config.vocab_size), logp_tol=1e-5, grad_rel_tol=1e-5)


def test_each_prompt_and_completion_token_is_computed_once(tiny_model_dir):
    model = tg.load_model(str(tiny_model_dir), CPU, trainable=True)
    batch = random_batch(model.config.vocab_size)
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].numel()))
    tg.completion_logprobs(model, batch, temperature=1.0, shared_prefix=True)
    hook.remove()
    assert len(seen) == batch["prompt_ids"].shape[0]  # one model call per prompt
    assert sum(seen) == int(batch["prompt_mask"].sum() + batch["completion_mask"].sum())  # no pads, no repeats


def test_window_shorter_than_the_sequence_falls_back_to_the_naive_forward(tmp_path):
    import tiny

    model = tg.load_model(str(tiny.make_tiny_model(tmp_path, sliding_window=10)), CPU, trainable=True)
    batch = random_batch(model.config.vocab_size)  # prompts of 4-12 tokens, completions of up to 7
    assert_same(model, batch, logp_tol=1e-5, grad_rel_tol=1e-5)


def test_tree_mask_rejects_attention_without_4d_masks():
    with pytest.raises(ValueError, match="shared_prefix=false"):
        tg.tree_attention_mask(5, torch.tensor([2, 3]), "flash_attention_2")


def test_tree_mask_by_hand():
    mask = tg.tree_attention_mask(2, torch.tensor([2, 1]), "sdpa")[0, 0].int()
    assert mask.tolist() == [[1, 0, 0, 0, 0],   # prompt token 0
                             [1, 1, 0, 0, 0],   # prompt token 1
                             [1, 1, 1, 0, 0],   # completion 0, token 0
                             [1, 1, 1, 1, 0],   # completion 0, token 1
                             [1, 1, 0, 0, 1]]   # completion 1, token 0: not completion 0
    additive = tg.tree_attention_mask(2, torch.tensor([2, 1]), "eager")[0, 0]
    assert torch.equal(additive == 0, mask.bool())


def chat(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=False)


@pytest.mark.parametrize("greedy", [True, False])
def test_shared_prefix_generation_equals_plain_generate(tiny_model_dir, greedy):
    model = tg.load_model(str(tiny_model_dir), CPU, trainable=False)
    tokenizer = tg.load_tokenizer(str(tiny_model_dir))
    prompts = [chat(tokenizer, "VIEWER short"), chat(tokenizer, "OPTIONS 1. a much longer prompt " * 4)]
    outs = []
    for shared in (False, True):
        torch.manual_seed(5)  # sampling consumes the RNG the same way on both paths
        outs.append(rollout.generate(model, tokenizer, prompts, 3, 12, temperature=1.0, greedy=greedy,
                                     shared_prefix=shared))
    assert torch.equal(outs[0].completion_ids, outs[1].completion_ids)
    assert len(set(outs[0].texts)) > 1  # not a degenerate all-equal output


def test_shared_prefix_greedy_generation_on_the_real_model(embedded_model_dir):
    model = tg.load_model(embedded_model_dir, CPU, trainable=False)
    tokenizer = tg.load_tokenizer(embedded_model_dir)
    prompts = real_prompts(tokenizer)
    plain = rollout.generate(model, tokenizer, prompts, 2, 6, greedy=True, shared_prefix=False)
    shared = rollout.generate(model, tokenizer, prompts, 2, 6, greedy=True, shared_prefix=True)
    assert plain.texts == shared.texts and torch.equal(plain.completion_ids, shared.completion_ids)
