"""A tiny random Llama and a small BPE tokenizer trained on the bundled prompts: no download needed."""
import json
from pathlib import Path

CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")


def corpus():
    import data
    import prompts

    for name in data.BUNDLED_FILES:
        for line in (data.DATA_DIR / name).read_text(encoding="utf-8").splitlines()[:200]:
            yield json.loads(line)["state_text"]
    yield prompts.SYSTEM_PROMPT
    yield prompts.ANSWER_SYSTEM_PROMPT + prompts.ANSWER_PREFIX + "</answer><think></think><opinion></opinion>"


def make_tiny_model(folder, vocab_size=600, hidden=32, layers=2, seed=0, sliding_window=None):
    """A tiny Llama, or with `sliding_window` a tiny Mistral (its KV cache uses sliding-window layers)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                              PreTrainedTokenizerFast)

    folder = Path(folder)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        bos_token="<|im_start|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config_class = MistralConfig if sliding_window else LlamaConfig
    extra = {"sliding_window": sliding_window} if sliding_window else {}
    config = config_class(**extra, vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, initializer_range=0.2)
    # A wide init makes greedy outputs vary with the prompt, so equality tests compare real tokens.
    model = (MistralForCausalLM if sliding_window else LlamaForCausalLM)(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def random_batch(vocab, n_prompts=3, G=4, P=12, C=7, seed=0):
    """Rollouts of random tokens: left-padded prompts and completions of different lengths."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (n_prompts, P), generator=gen)
    pad = torch.tensor([0, 5, 2, 8][:n_prompts])
    prompt_mask = (torch.arange(P)[None] >= pad[:, None]).long()
    completion_ids = torch.randint(3, vocab, (n_prompts * G, C), generator=gen)
    lengths = torch.randint(1, C + 1, (n_prompts * G,), generator=gen)
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask}


def chat(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         tokenize=False)


def real_prompts(tokenizer, n=2):
    """The first training rows' prompts in answer mode, as the default run renders them."""
    import data
    import prompts

    train_rows, _ = data.load_examples("", 0.1, 0, log=lambda msg: None)
    return [prompts.PromptFormat("answer").text(tokenizer, row) for row in train_rows[:n]]
