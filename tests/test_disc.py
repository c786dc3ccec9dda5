"""The GAIL discriminator: batched scoring, reward forms, one model across ranks, learning."""
import math
import random

import pytest
import torch

import checkpoint
import data
import disc
import rewards
import train_grail as tg
from test_distributed import ROOT, run

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return checkpoint.load_model(str(tiny_model_dir), CPU, trainable=False), checkpoint.load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="module")
def rows():
    train, _ = data.load_examples("", 0.1, 0, log=lambda msg: None)
    return train


def prefix(row, k):
    """The row with its first k options: option k keeps its state and its displayed position."""
    return {**row, "slate_items_json": row["slate_items_json"][:k], "n_options": k}


def test_batched_table_equals_scoring_each_pair_alone(tiny, rows):
    model, tokenizer = tiny
    discriminator = disc.build("", model, tokenizer, CPU, seed=0).eval()
    batch = [rows[i] for i in (0, 5, 400, 700)]  # different slate sizes and state lengths
    with torch.no_grad():
        table = discriminator(batch)
        for b, row in enumerate(batch):
            for k in range(1, row["n_options"] + 1):
                alone = discriminator([prefix(row, k)])[0, k - 1]
                assert abs(alone.item() - table[b, k - 1].item()) < 1e-5
            assert torch.isinf(table[b, row["n_options"]:]).all()


def test_the_displayed_position_changes_the_score(tiny, rows):
    model, tokenizer = tiny
    discriminator = disc.build("", model, tokenizer, CPU, seed=0).eval()
    row = next(r for r in rows if r["n_options"] >= 4)
    reversed_row = {**row, "slate_items_json": row["slate_items_json"][::-1]}
    with torch.no_grad():
        table, flipped = discriminator([row, reversed_row])
        n = row["n_options"]
        moved = [abs(table[k] - flipped[n - 1 - k]).item() for k in range(n) if k != n - 1 - k]  # same title, other slot
        assert min(moved) > 1e-3
        discriminator.position.weight.zero_()  # without the position feature only the titles count
        table, flipped = discriminator([row, reversed_row])
        assert torch.allclose(table[:n], flipped[:n].flip(0), atol=1e-5)


def test_policy_pairs_remember_the_slate_as_shown(tiny, rows):
    model, tokenizer = tiny
    cfg = tg.Config(gail_disc_batch=4, seed=0)
    trainer = disc.DiscriminatorTrainer(disc.build("", model, tokenizer, CPU, seed=0), rows[:5], cfg, rank=0)
    row = rows[0]
    shown = {**row, "slate_items_json": row["slate_items_json"][::-1]}
    rewards_, _ = trainer.policy_rewards([row, shown], [0, 0], [1, None, 1, 2], num_generations=2)
    assert rewards_[1] == 0.0 and len(trainer.buffer) == 3
    n = row["n_options"]
    assert trainer.buffer[0] == disc.Pair(0, 1) and trainer.buffer[1] == disc.Pair(0, 1, list(range(n))[::-1])
    assert trainer.buffer[1].shown(trainer.rows)["slate_items_json"] == shown["slate_items_json"]


def test_with_shuffled_slates_the_humans_clicks_are_shown_shuffled_too():
    """With shuffle_slates the policy's pairs sit in shuffled slots; the humans' must too, or D
    separates them by the slot alone. Every human here clicks the first original option: shown
    shuffled, each slot holds about a quarter of their clicks, each the clicked item."""
    rows = planted_rows(50, random.Random(0))
    rows = [{**row, "gold_index": 1} for row in rows]

    def humans(shuffle):
        cfg = tg.Config(gail_disc_batch=400, shuffle_slates=shuffle, seed=0)
        return disc.DiscriminatorTrainer(TabularStub(), rows, cfg, rank=0).sample()[0]

    pairs = humans(True)
    for p in pairs:
        assert p.shown(rows)["slate_items_json"][p.option - 1] == rows[p.row]["slate_items_json"][0]
    shares = [sum(p.option == k for p in pairs) / len(pairs) for k in range(1, 5)]
    assert all(0.17 < share < 0.33 for share in shares), shares
    assert pairs == humans(True)  # seeded: a rerun (and a resumed one, through the checkpointed RNG) agrees
    assert all(p.option == 1 and p.order is None for p in humans(False))


class TabularStub(torch.nn.Module):
    """A discriminator with one parameter, for tests of the trainer's sampling alone."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))


def test_reward_forms_by_hand():
    logits = torch.tensor([0.0, 2.0, -1.0])
    d = torch.sigmoid(logits)
    assert torch.allclose(disc.reward_values(logits, "prob", 1.0, 5.0), d)
    assert torch.allclose(disc.reward_values(logits, "logit", 2.0, 5.0), torch.tensor([0.0, 4.0, -2.0]))
    assert torch.allclose(disc.reward_values(logits, "neglog", 1.0, 5.0), -torch.log(1 - d))
    assert torch.allclose(disc.reward_values(torch.tensor([9.0, -9.0]), "logit", 1.0, 5.0), torch.tensor([5.0, -5.0]))


def test_weights_normalised_to_sum_one():
    assert rewards.mix_disc([1.0, 0.0], [0.0, 0.9], 0.5) == pytest.approx([2 / 3, 0.3])
    assert rewards.mix_disc([0.4], [0.1], 0.0) == [0.4]


def test_unparseable_and_out_of_slate_choices_get_no_disc_reward(tiny, rows):
    model, tokenizer = tiny
    discriminator = disc.build("", model, tokenizer, CPU, seed=0)
    row = rows[0]
    texts = ["1</answer>", "one</answer>", f"{row['n_options'] + 1}</answer>", "2</answer>"]
    choices = [rewards.parse(text, False, row, answer_only=True).choice for text in texts]
    assert choices == [1, None, None, 2]  # parsed and range-checked once, before the discriminator
    out, d_valid, d_table = disc.choice_rewards(discriminator, [row], choices, 4, "prob", 1.0, 5.0)
    assert out[1] == 0.0 and out[2] == 0.0 and 0 < out[0] < 1 and 0 < out[3] < 1
    assert len(d_valid) == 2 and d_valid == pytest.approx([out[0], out[3]])
    assert d_table[0, :2].tolist() == pytest.approx([out[0], out[3]])


@pytest.mark.parametrize("form", sorted(disc.REWARD_FORMS))
@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_an_unparseable_answer_never_out_earns_a_parseable_one(form, alpha):
    """Whatever D thinks of the valid choices (logits from far below to far above 0), an
    unparseable answer earns no more than the worst of them: with the logit form a 0 would beat
    every choice D scores below 1/2, the policy's usual case while D is ahead."""
    logits = torch.tensor([[-30.0, -0.85, 0.0, 2.0, 30.0]])
    out, _, _ = disc.choice_rewards(lambda rows: logits, [{}], [1, 2, 3, 4, 5, None], 6, form, alpha, 5.0)
    assert out[5] <= min(out[:5])
    assert out[5] == pytest.approx(-5.0 if form == "logit" else 0.0)


def test_diagnostics_by_position_and_on_heldout_humans():
    """The per-position counts (humans' clicks, the policy's choices, D of every shown option) and
    the held-out accuracy, summed over ranks, on hand-made numbers."""
    rows = [{"gold_index": 1, "n_options": 3}, {"gold_index": 2, "n_options": 2}]
    table = torch.tensor([[0.9, 0.2, 0.4], [0.6, 0.8, 0.0]])
    counts = disc.position_counts(rows, [1, 1, None, 2], table)  # G = 2
    assert counts == {1: [1, 2, pytest.approx(1.5), 2], 2: [1, 1, pytest.approx(1.0), 2], 3: [0, 0, pytest.approx(0.4), 1]}
    rank0 = {"d_policy": [0.9, 0.2], "d_heldout_human": [0.7, 0.4], "positions": counts}
    rank1 = {"d_policy": [0.3], "d_heldout_human": [0.8], "positions": {1: [1, 1, 0.5, 1]}}
    out = disc.step_metrics([rank0, rank1], [])
    assert out["disc/heldout_acc_human"] == pytest.approx(2 / 3) and out["disc/fresh_acc_policy"] == pytest.approx(2 / 3)
    assert out["disc/heldout_acc"] == pytest.approx(2 / 3)
    assert out["disc/pos1/human_share"] == pytest.approx(2 / 3) and out["disc/pos1/policy_share"] == pytest.approx(3 / 4)
    assert out["disc/pos1/mean_d"] == pytest.approx(2.0 / 3) and out["disc/pos3/mean_d"] == pytest.approx(0.4)
    assert out["disc/loss"] is None  # no update this step (a warm-up-free first step, say)


def test_heldout_pairs_are_the_validation_rows_clicks(tiny, rows):
    model, tokenizer = tiny
    cfg = tg.Config(seed=0)
    trainer = disc.DiscriminatorTrainer(disc.build("", model, tokenizer, CPU, seed=0), rows[:5], cfg, 0, rows[5:9])
    d = trainer.heldout_human_d()
    with torch.no_grad():
        table = trainer.model(trainer.heldout)
    assert sorted(map(id, trainer.heldout)) == sorted(map(id, rows[5:9]))
    assert d == pytest.approx([torch.sigmoid(table[i, r["gold_index"] - 1]).item() for i, r in enumerate(trainer.heldout)])


def test_ranks_hold_identical_weights_after_updates(tiny_model_dir, tmp_path):
    result = run([str(ROOT / "tests" / "disc_worker.py"), str(tiny_model_dir), str(tmp_path / "d")], nproc=2)
    assert result.returncode == 0, result.stderr[-3000:]
    a = torch.load(tmp_path / "d.rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "d.rank1.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    init = disc.build("", checkpoint.load_model(str(tiny_model_dir), CPU, False),
                      checkpoint.load_tokenizer(str(tiny_model_dir)), CPU, seed=3).state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a)  # the updates did change them


def planted_rows(n, rng):
    """Humans always click the option whose title holds the marker word."""
    words = "gun wage law vote rally news debate policy senate court market jobs".split()
    out = []
    for i in range(n):
        titles = [" ".join(rng.choice(words) for _ in range(4)) for _ in range(4)]
        gold = rng.randrange(4)
        titles[gold] = titles[gold] + " zebra"
        out.append({"id": str(i), "viewer_profile_sentence": f"viewer {rng.choice(words)}", "watched_detailed_json": [],
                    "slate_items_json": [{"id": f"{i}-{k}", "title": t} for k, t in enumerate(titles)],
                    "gold_index": gold + 1, "n_options": 4})
    return out


def test_learns_a_planted_signal(tiny):
    model, tokenizer = tiny
    rng = random.Random(0)
    train, held_out = planted_rows(200, rng), planted_rows(60, rng)
    cfg = tg.Config(gail_lr=1e-3, gail_buffer_size=4096, gail_disc_batch=16, seed=0)
    trainer = disc.DiscriminatorTrainer(disc.build("", model, tokenizer, CPU, seed=0), train, cfg, rank=0)
    trainer.add_policy_pairs([disc.Pair(i, k) for i, row in enumerate(train) for k in range(1, 5)
                              if k != row["gold_index"]])
    for _ in range(150):
        trainer.step()
    with torch.no_grad():
        table = trainer.model(held_out)
    pos = [table[i, r["gold_index"] - 1].item() for i, r in enumerate(held_out)]
    neg = [table[i, k].item() for i, r in enumerate(held_out) for k in range(4) if k != r["gold_index"] - 1]
    assert auc(pos, neg) > 0.9


def auc(scores_pos, scores_neg):
    """Probability that a random positive outscores a random negative (ties count half)."""
    wins = sum((p > n) + 0.5 * (p == n) for p in scores_pos for n in scores_neg)
    return wins / (len(scores_pos) * len(scores_neg)) if scores_pos and scores_neg else math.nan


def test_auc_by_hand():
    assert auc([3, 2], [1, 2]) == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    assert math.isnan(auc([], [1]))


def test_checkpoint_state_restores_the_trainer_exactly(tiny, rows, tmp_path):
    import json

    model, tokenizer = tiny

    def trainer():
        cfg = tg.Config(gail_lr=1e-3, gail_buffer_size=16, gail_disc_batch=6, gail_label_smoothing=0.1,
                        gail_negatives="wrong", seed=0)
        return disc.DiscriminatorTrainer(disc.build("", model, tokenizer, CPU, seed=0), rows[:30], cfg, rank=0)

    a = trainer()
    a.add_policy_pairs([disc.Pair(i, 1) for i in range(30)])  # "wrong" keeps only choices != gold
    assert all(p.option != rows[p.row]["gold_index"] for p in a.buffer) and len(a.buffer) <= 16
    a.step()
    torch.save(a.state_dict(), tmp_path / "disc.pt")
    (tmp_path / "extra.json").write_text(json.dumps(a.extra_state()))
    b = trainer()
    b.load(torch.load(tmp_path / "disc.pt", weights_only=True), json.loads((tmp_path / "extra.json").read_text()))
    stats_a, stats_b = a.step(), b.step()
    assert stats_a == stats_b
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_hf_encoder_backbone_scores_the_same_way(tiny, rows, tmp_path):
    """GAIL_DISC_MODEL names an HF encoder (here a tiny random BERT saved to a folder, standing in
    for distilbert-base-uncased): same batched table, and its scores train."""
    from transformers import BertConfig, BertModel

    model, tokenizer = tiny
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    discriminator = disc.build(str(tmp_path), model, tokenizer, CPU, seed=0).eval()
    assert isinstance(discriminator.encoder, disc.HFEncoder)
    row = rows[3]
    with torch.no_grad():
        table = discriminator([row, rows[4]])
        alone = discriminator([prefix(row, 2)])
    assert abs(alone[0, 1].item() - table[0, 1].item()) < 1e-5
    cfg = tg.Config(gail_lr=1e-3, gail_buffer_size=32, gail_disc_batch=4, gail_gradient_penalty=0.1, seed=0)
    trainer = disc.DiscriminatorTrainer(discriminator.train(), rows[:20], cfg, rank=0)
    trainer.add_policy_pairs([disc.Pair(i, 1) for i in range(20)])
    before = [p.clone() for p in discriminator.parameters()]
    assert math.isfinite(trainer.step()["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, discriminator.parameters()))
