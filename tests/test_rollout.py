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


# --- samples come from softmax(logits / T), whatever the checkpoint's generation config says ---

# Every field of a generation config that reshapes the next-token distribution or the decoding, set
# to a value that would visibly change it (what hub models ship: Qwen2.5's repetition_penalty 1.05, ...).
LEAKY_GENERATION_CONFIG = dict(
    repetition_penalty=1.5, min_p=0.2, typical_p=0.5, no_repeat_ngram_size=1, bad_words_ids=[[5]],
    suppress_tokens=[6, 7], begin_suppress_tokens=[8], forced_bos_token_id=9, forced_eos_token_id=10,
    sequence_bias=[[[11], 4.0]], renormalize_logits=True, epsilon_cutoff=0.01, eta_cutoff=0.01,
    min_new_tokens=2, exponential_decay_length_penalty=(1, 1.5), guidance_scale=1.5, top_k=5, top_p=0.5,
    temperature=0.3, num_beams=2, do_sample=False, length_penalty=2.0, diversity_penalty=0.0)


@pytest.fixture
def leaky_model(tiny_model_dir):
    model = checkpoint.load_model(str(tiny_model_dir), CPU, trainable=False)
    for key, value in LEAKY_GENERATION_CONFIG.items():
        setattr(model.generation_config, key, value)
    return model, checkpoint.load_tokenizer(str(tiny_model_dir))


def record_processors(monkeypatch):
    """The class names of every logits processor `generate` builds, per call."""
    from transformers.generation.utils import GenerationMixin

    seen, build = [], GenerationMixin._get_logits_processor

    def recording(self, *args, **kwargs):
        processors = build(self, *args, **kwargs)
        seen.append(sorted(type(p).__name__ for p in processors))
        return processors

    monkeypatch.setattr(GenerationMixin, "_get_logits_processor", recording)
    return seen


def one_prompt(model, tokenizer):
    return rollout.encode_prompts(tokenizer, [chat(tokenizer, "VIEWER OPTIONS 1. a 2. b")], CPU)


def test_checkpoint_generation_config_does_not_shape_sampling(leaky_model, monkeypatch):
    model, tokenizer = leaky_model
    ids, mask = one_prompt(model, tokenizer)
    seen = record_processors(monkeypatch)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=True, temperature=0.7)
    assert {"RepetitionPenaltyLogitsProcessor", "NoRepeatNGramLogitsProcessor", "MinPLogitsWarper",
            "SuppressTokensLogitsProcessor"} <= set(seen[-1])  # the fields are live in a plain generate
    for greedy, allowed in ((False, {"TemperatureLogitsWarper", "TopPLogitsWarper"}), (True, set())):
        out = rollout.sample(model, ids, mask, 3, 4, [tokenizer.eos_token_id], tokenizer.pad_token_id,
                             temperature=0.7, top_p=0.9, greedy=greedy)
        assert set(seen[-1]) == allowed, seen[-1]
        assert out.shape[0] == 3  # one sequence per sample: no beams
    assert model.generation_config.repetition_penalty == 1.5  # the checkpoint's own config is left as it was


@pytest.mark.parametrize("temperature, top_p", [(0.7, 1.0), (1.3, 0.9)])
def test_first_token_frequencies_match_softmax_of_logits_over_t(leaky_model, temperature, top_p):
    model, tokenizer = leaky_model
    ids, mask = one_prompt(model, tokenizer)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits[0, -1].float()
    want = torch.softmax(logits / temperature, -1)
    if top_p < 1:  # the nucleus: the most likely tokens until their mass reaches top_p, renormalised
        sorted_p, order = want.sort(descending=True)
        keep = (sorted_p.cumsum(0) - sorted_p) < top_p
        want = torch.zeros_like(want).scatter(0, order[keep], sorted_p[keep])
        want /= want.sum()
    N = 6000
    torch.manual_seed(0)
    first = rollout.sample(model, ids, mask, N, 1, [tokenizer.eos_token_id], tokenizer.pad_token_id,
                           temperature=temperature, top_p=top_p)[:, 0]
    got = torch.bincount(first, minlength=want.numel()).float() / N
    sigma = (want * (1 - want) / N).sqrt()
    assert (got - want).abs().max() < 1e-3 + (5 * sigma).max(), (got - want).abs().max()
    # A statistic that sees all tokens at once: chi-square over tokens expected >= 5 times, with the rest pooled.
    common = want * N >= 5
    observed = torch.cat([got[common] * N, (got[~common].sum() * N).view(1)])
    expected = torch.cat([want[common] * N, (want[~common].sum() * N).view(1)])
    dof = int(common.sum())
    chi2 = ((observed - expected) ** 2 / expected.clamp_min(1e-9)).sum().item()
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, (chi2, dof)
    assert want.max() < 0.5  # a spread-out distribution, so the check sees many tokens
