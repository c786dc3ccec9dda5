"""choices.py: the exact choice distribution against brute force and against sampled answers, and
the scores of a distribution by hand."""
import math
from collections import Counter

import pytest
import torch

import checkpoint
import choices
import prompts
import rewards
import rollout
import schema

CPU = torch.device("cpu")


def row_with(n, gold=1):
    slate = [{"id": f"v{k}", "title": f"Video number {k}"} for k in range(1, n + 1)]
    return schema.clean_row({"slate_items_json": slate, "gold_index": gold, "viewer_profile_sentence": "a viewer"})


def brute_force_closed(model, tokenizer, prefix, label, close, stop_ids):
    """log P(label's tokens | prefix) x (P(a stop token next) + P(the closing tag next, its last token
    any token whose text starts with that token's)), from one plain forward over the whole sequence."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([prefix + label + close])).logits[0].double(), -1)
    follow = [logp[len(prefix) - 1 + i, token].item() for i, token in enumerate(label + close)]
    after = logp[len(prefix) - 1 + len(label)]
    last = tokenizer.decode([close[-1]])
    closers = [i for i in range(len(tokenizer)) if tokenizer.decode([i]).startswith(last)]
    p_last = sum(logp[len(prefix) + len(label) + len(close) - 2, i].exp().item() for i in closers)
    p_close = sum(after[s].exp().item() for s in stop_ids) + math.exp(sum(follow[len(label):-1])) * p_last
    return sum(follow[:len(label)]) + math.log(p_close)


def brute_force_logprob(model, tokenizer, prompt_text, k, stop_ids):
    """log p(k): the digits of k, closed by a stop token or "</answer>"."""
    return brute_force_closed(model, tokenizer, tokenizer(prompt_text, add_special_tokens=False).input_ids,
                              tokenizer.encode(str(k), add_special_tokens=False),
                              tokenizer.encode("</answer>", add_special_tokens=False), stop_ids)


def tiny_with_attention(model_dir, attention):
    """The tiny model under `attention`, its tokenizer and its stop ids."""
    model = checkpoint.load_model(str(model_dir), CPU, trainable=False)
    model.set_attn_implementation(attention)
    tokenizer = checkpoint.load_tokenizer(str(model_dir))
    return model, tokenizer, rollout.stop_token_ids(model, tokenizer)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_exact_distribution_equals_brute_force(tiny_model_dir, attention):
    model, tokenizer, stop_ids = tiny_with_attention(tiny_model_dir, attention)
    row = row_with(12)  # options 10-12 take two digits: "1" must not count their mass
    text = prompts.PromptFormat("answer").text(tokenizer, row)
    exact = choices.answer_logprobs(model, tokenizer, text, 12, stop_ids)[0]
    want = [brute_force_logprob(model, tokenizer, text, k, stop_ids) for k in range(1, 13)]
    assert exact.tolist() == pytest.approx(want, abs=1e-4)
    assert exact.exp().sum() < 1  # the rest is invalid mass


def test_window_shorter_than_the_prompt_scores_each_option_alone(tmp_path):
    import tiny

    folder = tiny.make_tiny_model(tmp_path, sliding_window=16)
    model, tokenizer = checkpoint.load_model(str(folder), CPU, trainable=False), checkpoint.load_tokenizer(str(folder))
    stop_ids = rollout.stop_token_ids(model, tokenizer)
    text = prompts.PromptFormat("answer").text(tokenizer, row_with(3))
    exact = choices.answer_logprobs(model, tokenizer, text, 3, stop_ids)[0]
    assert exact.tolist() == pytest.approx([brute_force_logprob(model, tokenizer, text, k, stop_ids)
                                            for k in (1, 2, 3)], abs=1e-4)


def teach(model, tokenizer, text, targets, steps=150):
    """A few Adam steps of maximum likelihood on completions drawn with the given weights, so the
    tiny model puts most of its mass on answers."""
    return teach_tokens(model, tokenizer(text, add_special_tokens=False).input_ids,
                        {tuple(tokenizer.encode(c, add_special_tokens=False)): w for c, w in targets.items()}, steps)


def teach_tokens(model, prompt, targets, steps=150):
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        for completion, weight in targets.items():
            ids = prompt + list(completion)
            logits = model(input_ids=torch.tensor([ids])).logits[0, len(prompt) - 1:-1]
            loss = weight * torch.nn.functional.cross_entropy(logits, torch.tensor(ids[len(prompt):]))
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_exact_distribution_agrees_with_sampled_answers(tiny_model_dir):
    model = checkpoint.load_model(str(tiny_model_dir), CPU, trainable=True)
    tokenizer = checkpoint.load_tokenizer(str(tiny_model_dir))
    row = row_with(3)
    text = prompts.PromptFormat("answer").text(tokenizer, row)
    eos = tokenizer.eos_token
    teach(model, tokenizer, text, {f"1</answer>{eos}": 0.5, f"2{eos}": 0.3, f"3</answer>{eos}": 0.2})
    exact = choices.answer_logprobs(model, tokenizer, text, 3, rollout.stop_token_ids(model, tokenizer))[0].exp()
    assert 0.8 < exact.sum() <= 1.0 and (exact > 0.05).all()  # the test compares real masses
    K = 600
    torch.manual_seed(0)
    out = rollout.generate(model, tokenizer, [text], K, 12, temperature=1.0)  # room for "</answer>"
    answers = Counter(rewards.parse(t, c, row, answer_only=True).choice for t, c in zip(out.texts, out.truncated.tolist()))
    for k in (1, 2, 3):
        p = exact[k - 1].item()
        assert abs(answers[k] / K - p) < 4 * math.sqrt(p * (1 - p) / K) + 0.01, (k, answers, exact)


def test_a_tag_closed_by_a_merged_token_counts(tiny_model_dir, tmp_path):
    """The text closes the tag whatever token carries its ">": a model that writes "1</answer" and
    then "><" (one token, as SmolLM2's; the untrained model's usual spelling of the prompt's example)
    answers 1 for the parser, and the exact p(1) counts it: against the brute force, and against
    sampled answers."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = checkpoint.load_tokenizer(str(tiny_model_dir))
    tokenizer.add_tokens(["><"])
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = checkpoint.load_model(str(tmp_path), CPU, trainable=True)
    stop_ids = rollout.stop_token_ids(model, tokenizer)
    row = row_with(3)
    text = prompts.PromptFormat("answer").text(tokenizer, row)
    ids = lambda piece: tokenizer.encode(piece, add_special_tokens=False)
    merged, eos = tokenizer.convert_tokens_to_ids("><"), tokenizer.eos_token_id
    teach_tokens(model, ids(text), {tuple(ids("1") + ids("</answer") + [merged] + ids("opinion>") + [eos]): 0.6,
                                    tuple(ids("2</answer>") + [eos]): 0.4})
    exact = choices.answer_logprobs(model, tokenizer, text, 3, stop_ids)[0]
    assert exact.tolist() == pytest.approx([brute_force_logprob(model, tokenizer, text, k, stop_ids)
                                            for k in (1, 2, 3)], abs=1e-4)
    exact = exact.exp()
    assert exact[0] > 0.2  # counted through "><": the tag's own ">" is rare after "1</answer"
    K = 400
    torch.manual_seed(0)
    out = rollout.generate(model, tokenizer, [text], K, 14, temperature=1.0)
    answers = Counter(rewards.parse(t, c, row, answer_only=True).choice
                      for t, c in zip(out.texts, out.truncated.tolist()))
    for k in (1, 2):
        p = exact[k - 1].item()
        assert abs(answers[k] / K - p) < 4 * math.sqrt(p * (1 - p) / K) + 0.01, (k, answers, exact)


def brute_force_opinion(model, tokenizer, prompt_text, gold):
    """log p(d | gold) per direction, each its own sequence after prompt + "gold</answer><opinion>",
    closed by "</opinion>" (a turn that ends inside the tag is no opinion to the reward's parser)."""
    prefix = tokenizer(prompt_text, add_special_tokens=False).input_ids + [
        t for piece in (str(gold), "</answer>", "<opinion>") for t in tokenizer.encode(piece, add_special_tokens=False)]
    close = tokenizer.encode("</opinion>", add_special_tokens=False)
    return [brute_force_closed(model, tokenizer, prefix, tokenizer.encode(label, add_special_tokens=False), close,
                               []) for label in schema.OPINION_LABELS]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_opinion_distribution_equals_brute_force_and_leaves_the_click_alone(tiny_model_dir, attention):
    model, tokenizer, stop_ids = tiny_with_attention(tiny_model_dir, attention)
    text = prompts.PromptFormat("answer").text(tokenizer, row_with(11))
    click, opinion = choices.answer_logprobs(model, tokenizer, text, 11, stop_ids, gold=10)
    assert opinion.tolist() == pytest.approx(brute_force_opinion(model, tokenizer, text, 10), abs=1e-4)
    alone = choices.answer_logprobs(model, tokenizer, text, 11, stop_ids)[0]  # no opinion branches in the tree
    assert click.tolist() == pytest.approx(alone.tolist(), abs=1e-5)
    assert choices.answer_logprobs(model, tokenizer, text, 11, stop_ids)[1] is None


def test_window_shorter_than_the_prompt_scores_each_opinion_alone(tmp_path):
    import tiny

    folder = tiny.make_tiny_model(tmp_path, sliding_window=16)
    model, tokenizer = checkpoint.load_model(str(folder), CPU, trainable=False), checkpoint.load_tokenizer(str(folder))
    stop_ids = rollout.stop_token_ids(model, tokenizer)
    text = prompts.PromptFormat("answer").text(tokenizer, row_with(3))
    _, opinion = choices.answer_logprobs(model, tokenizer, text, 3, stop_ids, gold=2)
    assert opinion.tolist() == pytest.approx(brute_force_opinion(model, tokenizer, text, 2), abs=1e-4)


def test_exact_opinion_distribution_agrees_with_sampled_opinions(tiny_model_dir):
    """Taught three opinion continuations of a click, the model's sampled continuations of the prompt
    and the click's tokens (as the exact distribution writes them) match the exact p(d | click)."""
    model = checkpoint.load_model(str(tiny_model_dir), CPU, trainable=True)
    tokenizer = checkpoint.load_tokenizer(str(tiny_model_dir))
    row = row_with(3, gold=2)
    text = prompts.PromptFormat("answer").text(tokenizer, row)
    prompt = tokenizer(text, add_special_tokens=False).input_ids
    answered, opened, words, close = choices.opinion_branches(tokenizer, 2)
    prefix, eos = prompt + answered + opened, tokenizer.eos_token_id
    answered_text = tokenizer.decode(answered + opened)  # the turn after the prompt's "<answer>"
    teach_tokens(model, prefix, {tuple(words[0] + close + [eos]): 0.4, tuple(words[1] + close + [eos]): 0.25,
                                 tuple(words[2] + close + [eos]): 0.2,
                                 tuple(words[1] + [eos]): 0.15})  # ends the turn inside the tag: no opinion
    stop_ids = rollout.stop_token_ids(model, tokenizer)
    exact = choices.answer_logprobs(model, tokenizer, text, 3, stop_ids, gold=2)[1].exp()
    assert (exact > 0.05).all() and exact.sum() < 0.95  # real masses, and the unclosed turn's left out
    K = 600
    torch.manual_seed(0)
    ids = torch.tensor([prefix])
    completions = rollout.sample(model, ids, torch.ones_like(ids), K, 24, stop_ids, eos, 1.0, 1.0, False, True)
    mask, truncated = rollout.completion_mask(completions, stop_ids)
    texts = tokenizer.batch_decode(completions.masked_fill(mask == 0, eos), skip_special_tokens=True)
    seen = Counter(rewards.parse(answered_text + t, cut, row, answer_only=True).opinion
                   for t, cut in zip(texts, truncated.tolist()))  # as the reward reads the whole turn
    for label, p in zip(schema.OPINION_LABELS, exact.tolist()):
        assert abs(seen[label] / K - p) < 4 * math.sqrt(p * (1 - p) / K) + 0.01, (label, seen, exact)


def test_scores_by_hand():
    rows = [row_with(2, gold=1), row_with(2, gold=2)]
    dists = [[0.6, 0.2], [0.5, 0.5]]  # row 1 has 0.2 invalid mass
    scores = choices.distribution_scores(rows, dists)
    q1 = [0.75, 0.25]
    assert scores["logloss"] == pytest.approx((-math.log(0.6) - math.log(0.5)) / 2)
    assert scores["logloss_renorm"] == pytest.approx((-math.log(0.75) - math.log(0.5)) / 2)
    assert scores["brier"] == pytest.approx(((q1[0] - 1) ** 2 + q1[1] ** 2 + 0.25 + 0.25) / 2)
    assert scores["valid_mass"] == pytest.approx(0.9)
    assert scores["position_mass"] == pytest.approx({"1": 0.625, "2": 0.375})
    assert scores["human_positions"] == {"1": 0.5, "2": 0.5}
    assert scores["tvd"] == pytest.approx(0.125)


def test_prior_uniform_collapse_and_calibration():
    train = [row_with(2, gold=1)] * 3 + [row_with(2, gold=2)] + [row_with(3, gold=3)]
    prior = choices.position_prior(train)
    assert prior(2) == pytest.approx([3.5 / 5, 1.5 / 5])  # add-0.5 counts of 2-option slates
    assert prior(4) == pytest.approx([0.25] * 4)  # no 4-option slate in training: uniform
    rows = [row_with(2, gold=g) for g in (1, 1, 2, 1)]
    constant = choices.choice_metrics(rows, [[0.0, 1.0]] * 4, train)
    assert constant["collapse"] == {"flag": True, "position": 2, "model_share": 1.0, "human_share": 0.25}
    assert constant["uniform"]["logloss"] == pytest.approx(math.log(2))
    assert constant["prior"]["logloss"] < constant["uniform"]["logloss"]
    assert set(constant["by_group"]) == {"None / None"}
    calibrated = choices.choice_metrics(rows, [[0.75, 0.25]] * 4, train)
    assert not calibrated["collapse"]["flag"] and calibrated["model"]["tvd"] == pytest.approx(0.0)
    cells = {round(c["predicted"], 2): c for c in calibrated["calibration"] if c["n"]}
    assert cells[0.75]["observed"] == 0.75 and cells[0.25]["observed"] == 0.25  # on the diagonal


def test_sampled_distribution_is_smoothed_over_options_and_invalid():
    got = choices.sampled_distribution([1, 1, None, 2], 3)
    assert got == pytest.approx([2.5 / 6, 1.5 / 6, 0.5 / 6])  # 4 samples + 0.5 x (3 options + invalid)


def test_under_autocast_the_head_projects_in_fp32(tiny_model_dir):
    """cast_lm_head_to_fp32 (the default): under bf16 autocast the logits are the fp32 projection of
    the trunk's last hidden state, not autocast's bf16 rounding of it."""
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    for fp32_head in (True, False):
        model = checkpoint.load_model(str(tiny_model_dir), CPU, trainable=False, fp32_head=fp32_head)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, output_hidden_states=True)
        want = out.hidden_states[-1].float() @ model.get_output_embeddings().weight.T
        if fp32_head:
            assert out.logits.dtype == torch.float32
            assert torch.allclose(out.logits, want, atol=1e-5)
        else:
            assert out.logits.dtype == torch.bfloat16


def test_bf16_exact_distributions_agree_with_fp32(tiny_model_dir):
    """The CPU evaluation runs under bf16 autocast with `cpu_bf16`, as CUDA's does with `bf16`: the
    exact click and opinion distributions of a model taught to answer stay within 0.02 of fp32's.
    (On the trained default model the fp32 head is what keeps them there: bench.roofline.)"""
    tokenizer = checkpoint.load_tokenizer(str(tiny_model_dir))
    text = prompts.PromptFormat("answer").text(tokenizer, row_with(3))
    eos = tokenizer.eos_token
    model = teach(checkpoint.load_model(str(tiny_model_dir), CPU, trainable=True), tokenizer, text,
                  {f"1</answer>{eos}": 0.5, f"2</answer><opinion>increase</opinion>{eos}": 0.3,
                   f"2</answer><opinion>decrease</opinion>{eos}": 0.1, f"3</answer>{eos}": 0.1})
    stop_ids = rollout.stop_token_ids(model, tokenizer)

    def distributions(autocast):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            click, opinion = choices.answer_logprobs(model, tokenizer, text, 3, stop_ids, gold=2)
        return torch.cat([click, opinion]).exp()

    fp32, bf16 = distributions(False), distributions(True)
    assert fp32[:3].sum() > 0.8 and fp32[3:].sum() > 0.5  # real masses on the click and the opinion
    assert (bf16 - fp32).abs().max() < 0.02
