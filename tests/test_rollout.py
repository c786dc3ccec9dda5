import pytest
import torch

import checkpoint
import grpo
import rollout
import tiny
from tiny import chat, random_batch, real_prompts

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_pair(tiny_model_dir):
    return (checkpoint.load_model(str(tiny_model_dir), torch.device("cpu"), trainable=False),
            checkpoint.load_tokenizer(str(tiny_model_dir)))


def test_completion_mask_stops_after_first_stop_token():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 9, 9, 9, 9]])
    mask, truncated = rollout.completion_mask(ids, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_generate_shapes_padding_and_masks(tiny_pair):
    model, tokenizer = tiny_pair
    torch.manual_seed(0)
    prompts = [chat(tokenizer, "OPTIONS 1. a"), chat(tokenizer, "VIEWER a much longer prompt " * 5)]
    out = rollout.generate(model, tokenizer, prompts, num_generations=3, max_new_tokens=12, temperature=1.0)
    assert out.prompt_ids.shape[0] == 2 and out.completion_ids.shape[0] == 6
    assert out.prompt_mask[0, 0] == 0 and out.prompt_mask[:, -1].all()  # left padding
    eos = tokenizer.eos_token_id
    for row, mask, cut in zip(out.completion_ids, out.completion_mask, out.truncated):
        n = int(mask.sum())
        stops = (row[:n] == eos).nonzero().flatten().tolist()
        assert stops == ([] if cut else [n - 1])  # nothing after the first EOS is kept
        assert (row[n:] == tokenizer.pad_token_id).all()
    assert len(out.texts) == 6


class Wrapper(torch.nn.Module):  # stands in for DistributedDataParallel
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_greedy_is_deterministic_and_works_through_a_wrapper(tiny_pair):
    model, tokenizer = tiny_pair
    prompts = [chat(tokenizer, "VIEWER x"), chat(tokenizer, "OPTIONS 1. y 2. z")]
    a = rollout.generate(model, tokenizer, prompts, 1, 10, greedy=True)
    b = rollout.generate(Wrapper(model), tokenizer, prompts, 1, 10, greedy=True)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.texts == b.texts


def test_training_logprobs_match_generation_under_left_padding(tiny_pair):
    """The training forward (positions from the attention mask) scores the same tokens the same way
    `generate` did, for prompts of different lengths."""
    model, tokenizer = tiny_pair
    prompts = [chat(tokenizer, "short"), chat(tokenizer, "a considerably longer prompt " * 6)]
    prompt_ids, prompt_mask = rollout.encode_prompts(tokenizer, prompts, torch.device("cpu"))
    gen = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=8, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, eos_token_id=-1,
                         pad_token_id=tokenizer.pad_token_id)
    completion_ids = gen.sequences[:, prompt_ids.shape[1]:]
    want = torch.stack([torch.log_softmax(step.float(), -1) for step in gen.logits], dim=1)
    want = want.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
             "completion_mask": torch.ones_like(completion_ids)}
    for shared in (False, True):
        with torch.no_grad():
            got = grpo.completion_logprobs(model, batch, temperature=1.0, shared_prefix=shared)
        assert torch.allclose(got, want, atol=1e-4), (shared, (got - want).abs().max())


# --- shared-prefix generation ---


def test_sliding_window_cache_takes_the_padded_batch_prefill(tmp_path):
    from transformers.cache_utils import DynamicLayer

    folder = str(tiny.make_tiny_model(tmp_path, sliding_window=64))
    model, tokenizer = checkpoint.load_model(folder, CPU, trainable=True), checkpoint.load_tokenizer(folder)
    batch = random_batch(model.config.vocab_size)
    cache = rollout.prompt_cache(model, batch["prompt_ids"], batch["prompt_mask"], 4)
    assert not all(type(layer) is DynamicLayer for layer in cache.layers)
    prompts = [chat(tokenizer, "VIEWER short"), chat(tokenizer, "OPTIONS 1. a much longer prompt " * 4)]
    outs = []
    for shared in (False, True):  # generation from that cache equals plain generate
        torch.manual_seed(5)
        outs.append(rollout.generate(model, tokenizer, prompts, 3, 12, shared_prefix=shared).completion_ids)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("greedy", [True, False])
def test_shared_prefix_generation_equals_plain_generate(tiny_model_dir, greedy):
    model = checkpoint.load_model(str(tiny_model_dir), CPU, trainable=False)
    tokenizer = checkpoint.load_tokenizer(str(tiny_model_dir))
    prompts = [chat(tokenizer, "VIEWER short"), chat(tokenizer, "OPTIONS 1. a much longer prompt " * 4)]
    outs = []
    for shared in (False, True):
        torch.manual_seed(5)  # sampling consumes the RNG the same way on both paths
        outs.append(rollout.generate(model, tokenizer, prompts, 3, 12, temperature=1.0, greedy=greedy,
                                     shared_prefix=shared))
    assert torch.equal(outs[0].completion_ids, outs[1].completion_ids)
    assert len(set(outs[0].texts)) > 1  # not a degenerate all-equal output


def test_shared_prefix_greedy_generation_on_the_real_model(embedded_model_dir):
    model = checkpoint.load_model(embedded_model_dir, CPU, trainable=False)
    tokenizer = checkpoint.load_tokenizer(embedded_model_dir)
    prompts = real_prompts(tokenizer)
    plain = rollout.generate(model, tokenizer, prompts, 2, 6, greedy=True, shared_prefix=False)
    shared = rollout.generate(model, tokenizer, prompts, 2, 6, greedy=True, shared_prefix=True)
    assert plain.texts == shared.texts and torch.equal(plain.completion_ids, shared.completion_ids)
