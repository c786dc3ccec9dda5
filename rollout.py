"""Rollouts with HF `generate`: a batch of chat prompts -> G sampled (or greedy) completions each.

Samples come from softmax(logits / T) (with top-p where asked) and nothing else: the loss, the KL and
the calibration reward all assume it. `generate` would merge the checkpoint's own generation config
into every call (a hub model's `repetition_penalty`, `min_p`, `no_repeat_ngram_size`,
`suppress_tokens`, ...); here it sees only the run's settings (`run_generation_config`).
"""
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from distributed import unwrap


@dataclass
class Rollout:
    prompt_ids: torch.Tensor       # [B, P] left-padded
    prompt_mask: torch.Tensor      # [B, P]
    completion_ids: torch.Tensor   # [B*G, C], sample j of prompt i at row i*G + j
    completion_mask: torch.Tensor  # [B*G, C] 1 up to and including the first end-of-turn token
    texts: list                    # [B*G] decoded completions (special tokens removed)
    truncated: torch.Tensor        # [B*G] bool: no end-of-turn token within the budget


def stop_token_ids(model, tokenizer):
    """Every token that ends a turn: the tokenizer's EOS plus the generation config's (chat models
    such as Qwen2.5 list several)."""
    ids = {tokenizer.eos_token_id}
    configured = unwrap(model).generation_config.eos_token_id
    ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


def mask_positions(attention_mask):
    """Position ids that count only real tokens, as `generate` computes them under left padding."""
    return (attention_mask.cumsum(dim=1) - 1).clamp_min(0)


def prompt_cache(model, prompt_ids, prompt_mask, num_generations):
    """Run each prompt once and repeat its KV cache G ways, laid out like the left-padded batch.

    Each prompt runs alone, without its padding, so no compute goes to pad tokens; its keys and
    values are then left-padded with zeros, which the attention mask hides."""
    from transformers.cache_utils import DynamicLayer

    P = prompt_ids.shape[1]
    outs = [model(input_ids=ids[mask.bool()].unsqueeze(0), use_cache=True, logits_to_keep=1)
            for ids, mask in zip(prompt_ids, prompt_mask)]
    cache = outs[0].past_key_values
    if not all(type(layer) is DynamicLayer for layer in cache.layers):  # e.g. sliding-window layers
        cache = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=mask_positions(prompt_mask),
                      use_cache=True, logits_to_keep=1).past_key_values
    else:
        for i, layer in enumerate(cache.layers):
            layers = [out.past_key_values.layers[i] for out in outs]
            layer.keys = torch.cat([_pad_left(part.keys, P) for part in layers])
            layer.values = torch.cat([_pad_left(part.values, P) for part in layers])
    cache.batch_repeat_interleave(num_generations)
    return cache


def _pad_left(states, length):
    """[1, heads, L, dim] -> [1, heads, length, dim] with zeros in front."""
    return torch.nn.functional.pad(states, (0, 0, length - states.shape[-2], 0))


def encode_prompts(tokenizer, prompt_texts, device):
    """Left-padded token ids: every prompt ends at the same column, so generation appends in place.
    The chat template already holds the special tokens, so none are added here."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompt_texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids.to(device), enc.attention_mask.to(device)


def completion_mask(completion_ids, stop_ids):
    """1 for every token up to and including the first stop token, 0 after it."""
    is_stop = torch.isin(completion_ids, torch.tensor(stop_ids, device=completion_ids.device))
    stops_before = is_stop.long().cumsum(dim=1) - is_stop.long()  # stops strictly before each token
    return (stops_before == 0).long(), ~is_stop.any(dim=1)


@torch.no_grad()
def generate(model, tokenizer, prompt_texts, num_generations, max_new_tokens,
             temperature=1.0, top_p=1.0, greedy=False, shared_prefix=True):
    """G completions per prompt. Greedy mode (evaluation) takes the argmax."""
    policy = unwrap(model)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompt_texts, next(policy.parameters()).device)
    stop_ids = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    completion_ids = sample(policy, prompt_ids, prompt_mask, num_generations, max_new_tokens, stop_ids, pad_id,
                            temperature, top_p, greedy, shared_prefix)
    mask, truncated = completion_mask(completion_ids, stop_ids)
    completion_ids = completion_ids.masked_fill(mask == 0, pad_id)
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, completion_ids, mask, texts, truncated)


def run_generation_config(max_new_tokens, stop_ids, pad_id, temperature=1.0, top_p=1.0, greedy=False):
    """Everything `generate` may do here: the run's temperature and top-p (top-k off), or greedy,
    the budget, the stop and pad ids. No stop ids: every sample runs the whole budget."""
    decoding = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    return GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids) or None, pad_token_id=pad_id,
                            **decoding)


@contextmanager
def only_generation_config(policy, config):
    """`generate` fills every field a passed config leaves unset from `policy.generation_config`
    (transformers' `_prepare_generation_config`), so the checkpoint's is swapped out for the call:
    unset fields then take the library's neutral defaults."""
    saved = policy.generation_config
    policy.generation_config = config
    try:
        yield
    finally:
        policy.generation_config = saved


@torch.no_grad()
def sample(policy, prompt_ids, prompt_mask, num_generations, max_new_tokens, stop_ids, pad_id,
           temperature=1.0, top_p=1.0, greedy=False, shared_prefix=True):
    """Completion token ids [B*G, <= max_new_tokens] of a left-padded prompt batch, decoded with
    `run_generation_config` only (the checkpoint's generation config does not take part).

    With `shared_prefix` each prompt is prefilled once and its cache expanded G ways, where
    `num_return_sequences=G` would prefill every prompt G times."""
    inputs = dict(input_ids=prompt_ids.repeat_interleave(num_generations, 0),
                  attention_mask=prompt_mask.repeat_interleave(num_generations, 0))
    if shared_prefix and num_generations > 1 and prompt_ids.shape[1] > 1:
        # The cache holds all but the last prompt token; `generate` runs that token per sample.
        inputs["past_key_values"] = prompt_cache(policy, prompt_ids[:, :-1], prompt_mask[:, :-1], num_generations)
    config = run_generation_config(max_new_tokens, stop_ids, pad_id, temperature, top_p, greedy)
    with only_generation_config(policy, config):
        out = policy.generate(**inputs, generation_config=config)
    return out[:, prompt_ids.shape[1]:]
