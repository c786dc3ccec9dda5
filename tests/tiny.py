"""A tiny random Llama and a small BPE tokenizer trained on the bundled prompts: no download needed."""
import json
from pathlib import Path

CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")


def corpus():
    import data

    for name in data.BUNDLED_FILES:
        for line in (data.DATA_DIR / name).read_text(encoding="utf-8").splitlines()[:200]:
            yield json.loads(line)["state_text"]
    yield data.SYSTEM_PROMPT
    yield data.ANSWER_SYSTEM_PROMPT + data.ANSWER_PREFIX + "</answer><think></think><opinion></opinion>"


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
