"""GAIL discriminator: D(state, option) = the logit that a viewer in `state` choosing `option` is a
human, not the policy. Its score joins the GRPO reward (GAIL_USE=1), so the policy is rewarded for
choices that look like people's.

Batched and slate-aware: each prompt's state is encoded once, all its slate options in one pass,
and a head scores every (state, option) pair into a logit table [B, N_max]. A completion that chose
option k reads its score from the table, so scoring B x G completions costs B states, not B x G texts.

An option is its title plus its displayed position (a learned embedding): which slot people click is
most of the behaviour on these rows, so D can reward the policy for clicking where people click.
Titles only, without channels, durations or counts: in the gun-control slates their absence marks
the click (how the rows were built), a cue no viewer chooses by.

One discriminator across ranks: rank 0's initial weights are broadcast and every update all-reduces
the gradients (mean), so every rank holds identical weights after every step.
"""
import math
import random
import statistics
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import data
import prompts
import schema
from errors import UserError, first_line

MAX_STATE_TOKENS = 384   # the state's first tokens: profile, viewpoint, current video, history, survey
MAX_OPTION_TOKENS = 48   # an option's title
HELDOUT_PAIRS = 64       # held-out human pairs scored every step (the diagnostics)
WIDTH, DEPTH, HEADS = 128, 2, 4  # the built-in encoder
REWARD_FORMS = {"prob": torch.sigmoid, "logit": lambda x: x,
                "neglog": F.softplus}  # f(logit); -log(1 - sigmoid(x)) = softplus(x)


# ---------------------------------------------------------------------------------------------
# Model


class TokenEncoder(torch.nn.Module):
    """Built-in backbone: the policy's token embeddings (frozen copy), projected to WIDTH, then a
    small transformer encoder; mean-pooled over the real tokens. Needs no download."""

    def __init__(self, policy_embeddings, pad_id):
        super().__init__()
        self.embed = torch.nn.Embedding.from_pretrained(policy_embeddings.detach().float().clone(), freeze=True,
                                                        padding_idx=pad_id)
        self.project = torch.nn.Linear(policy_embeddings.shape[1], WIDTH)
        self.position = torch.nn.Embedding(max(MAX_STATE_TOKENS, MAX_OPTION_TOKENS), WIDTH)
        layer = torch.nn.TransformerEncoderLayer(WIDTH, HEADS, 2 * WIDTH, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, DEPTH, enable_nested_tensor=False)

    def embed_tokens(self, ids):
        return self.project(self.embed(ids))

    def forward(self, ids, mask, inputs_embeds=None):
        x = self.embed_tokens(ids) if inputs_embeds is None else inputs_embeds
        x = x + self.position(torch.arange(ids.shape[1], device=ids.device))
        x = self.encoder(x, src_key_padding_mask=mask == 0)
        return mean_pool(x, mask)


class HFEncoder(torch.nn.Module):
    """An HF encoder (hub id or folder, e.g. distilbert-base-uncased as upstream) used the same
    batched way: mean-pooled last hidden state, projected to WIDTH."""

    def __init__(self, name):
        super().__init__()
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(name)
        self.project = torch.nn.Linear(self.model.config.hidden_size, WIDTH)

    def embed_tokens(self, ids):
        return self.model.get_input_embeddings()(ids)

    def forward(self, ids, mask, inputs_embeds=None):
        kwargs = {"input_ids": ids} if inputs_embeds is None else {"inputs_embeds": inputs_embeds}
        hidden = self.model(attention_mask=mask, **kwargs).last_hidden_state
        return self.project(mean_pool(hidden, mask))


def mean_pool(x, mask):
    weights = mask.unsqueeze(-1).to(x.dtype)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)


class Discriminator(torch.nn.Module):
    def __init__(self, encoder, tokenizer):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.position = torch.nn.Embedding(schema.MAX_OPTIONS, WIDTH)  # displayed slot 1..MAX_OPTIONS
        self.head = torch.nn.Sequential(torch.nn.Linear(3 * WIDTH, WIDTH), torch.nn.GELU(),
                                        torch.nn.Linear(WIDTH, 1))

    def tokenize(self, texts, max_tokens):
        device = next(self.parameters()).device
        self.tokenizer.padding_side = "right"
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_tokens,
                             add_special_tokens=False)
        return enc.input_ids.to(device), enc.attention_mask.to(device)

    def encode_rows(self, rows):
        """Token ids of each row's state [B, Ls] and of all its options [B * N_max, Lo], with an
        option mask [B, N_max]."""
        n_max = max(row["n_options"] for row in rows)
        options = [prompts.option_content(item) for row in rows for item in row["slate_items_json"]
                   + [{"title": ""}] * (n_max - row["n_options"])]
        option_mask = torch.tensor([[k < row["n_options"] for k in range(n_max)] for row in rows])
        return (self.tokenize([prompts.render_state(row) for row in rows], MAX_STATE_TOKENS),
                self.tokenize(options, MAX_OPTION_TOKENS), option_mask)

    def score_table(self, encoded, state_embeds=None):
        """Logits [B, N_max] (padding options at -inf): one state pass, one option pass, one head."""
        (state_ids, state_mask), (option_ids, option_mask_tokens), option_mask = encoded
        B, n_max = option_mask.shape
        state = self.encoder(state_ids, state_mask, inputs_embeds=state_embeds)           # [B, W]
        option = self.encoder(option_ids, option_mask_tokens).view(B, n_max, -1)           # [B, N, W]
        option = option + self.position(torch.arange(n_max, device=option.device))
        state = state.unsqueeze(1).expand_as(option)
        logits = self.head(torch.cat([state, option, state * option], dim=-1)).squeeze(-1)
        return logits.masked_fill(~option_mask.to(logits.device), float("-inf"))

    def forward(self, rows):
        return self.score_table(self.encode_rows(rows))


def build(gail_disc_model, policy, tokenizer, device, seed):
    """The discriminator on the policy's device: the built-in backbone ('') or an HF encoder. Rank 0's
    initial weights are broadcast, so every rank starts identical."""
    generator_state = torch.get_rng_state()
    torch.manual_seed(seed)  # the same init everywhere, without disturbing the sampler's RNG
    if gail_disc_model:
        from transformers import AutoTokenizer

        try:
            disc = Discriminator(HFEncoder(gail_disc_model), AutoTokenizer.from_pretrained(gail_disc_model))
        except (OSError, ValueError) as err:  # no such folder or hub id, offline, not an encoder
            raise UserError("model", f"cannot load the discriminator {gail_disc_model}: {first_line(err)}") from err
    else:
        disc = Discriminator(TokenEncoder(policy.get_input_embeddings().weight, tokenizer.pad_token_id), tokenizer)
    torch.set_rng_state(generator_state)
    disc.to(device)
    if dist.is_initialized():
        for tensor in disc.state_dict().values():
            dist.broadcast(tensor, src=0)
    return disc


# ---------------------------------------------------------------------------------------------
# Reward


def reward_values(logits, form, alpha, clip):
    """alpha * f(D) for D = sigmoid(logit), clipped to [-clip, clip]: `prob` D (upstream), `logit`
    log D - log(1 - D), `neglog` -log(1 - D)."""
    return (alpha * REWARD_FORMS[form](logits)).clamp(-clip, clip)


def reward_floor(form, alpha, clip):
    """The least reward a valid choice can get, an unparseable answer's: each f is monotone in the
    logit, so it is at D -> 0 or D -> 1 (0 for prob and neglog, -clip for logit). More would pay
    answering nothing over a choice D scores low: the logit form's 0 beats every D < 1/2."""
    ends = reward_values(torch.tensor([-math.inf, math.inf]), form, alpha, clip)
    return ends.nan_to_num(0.0).min().item()  # alpha = 0: 0 x inf is every reward's 0


def choice_rewards(disc, rows, choices, num_generations, form, alpha, clip):
    """Reward of each completion: rows are the B prompts as shown, choices the B x G parsed options
    (1..n_options, or None when unparseable: `reward_floor`, and no D). Returns (rewards, D of each
    valid choice, the probability table D [B, N_max] with 0 at padding options)."""
    with torch.no_grad():
        table = disc(rows)  # [B, N_max], one state pass for the G samples of a prompt
    prompt = torch.arange(len(choices), device=table.device) // num_generations
    valid = torch.tensor([c is not None for c in choices], device=table.device)
    option = torch.tensor([0 if c is None else c - 1 for c in choices], device=table.device)
    logits = table[prompt, option]
    rewards = torch.where(valid, reward_values(logits, form, alpha, clip),
                          torch.full_like(logits, reward_floor(form, alpha, clip)))
    return rewards.tolist(), torch.sigmoid(logits[valid]).tolist(), torch.sigmoid(table)


def position_counts(rows, choices, d_table):
    """Per displayed position k (1-based): [prompts whose human clicked k, valid policy choices of k,
    sum of D(state, k) over the prompts, prompts with a k-th option]. Summed over ranks and steps,
    the three shares side by side show D rewarding where people click, or where the policy piles up."""
    counts, table = {}, d_table.tolist()
    for row, scores in zip(rows, table):
        for k in range(1, row["n_options"] + 1):
            cell = counts.setdefault(k, [0, 0, 0.0, 0])
            cell[0] += row["gold_index"] == k
            cell[2] += scores[k - 1]
            cell[3] += 1
    for choice in choices:
        if choice is not None:
            counts[choice][1] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class Pair:
    """A (state, option) pair: training row `row`, shown with its slate in `order` (the original
    indices as displayed; None = the original order), choosing the option displayed at `option`
    (1-based)."""
    row: int
    option: int
    order: list = None

    @classmethod
    def displayed(cls, row, option, order):
        """Row `row`'s `option` on its slate shown in `order` (the original order is stored as None)."""
        return cls(row, option, None if order == sorted(order) else order)

    def shown(self, rows):
        row = rows[self.row]
        if self.order is None:
            return row
        return {**row, "slate_items_json": [row["slate_items_json"][i] for i in self.order]}


class DiscriminatorTrainer:
    """Discriminator updates on human pairs (the training split's clicks) mixed with a replay buffer
    of the policy's recent choices; and the policy's reward from the current discriminator."""

    def __init__(self, model, rows, cfg, rank, heldout_rows=()):
        """model: a Discriminator; rows: the training rows (human pairs index them); cfg: the gail_*,
        shuffle_slates and seed settings; heldout_rows: validation participants' rows, never trained
        on, whose clicks measure D on humans it has not seen (a seeded sample of HELDOUT_PAIRS)."""
        self.model, self.rows = model, rows
        heldout = list(heldout_rows) if rank == 0 else []  # the same numbers on every rank: rank 0 scores them
        pick = random.Random(f"{cfg.seed}:disc-heldout")
        self.heldout = pick.sample(heldout, min(HELDOUT_PAIRS, len(heldout)))
        if cfg.shuffle_slates:  # shown as D's human pairs are, so the diagnostic measures what D learns
            self.heldout = [data.shuffle_slate(row, pick) for row in self.heldout]
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.gail_lr)
        self.buffer, self.buffer_size = [], cfg.gail_buffer_size
        self.human_fraction, self.batch_size = cfg.gail_human_fraction, cfg.gail_disc_batch
        self.label_smoothing, self.gradient_penalty = cfg.gail_label_smoothing, cfg.gail_gradient_penalty
        self.negatives, self.shuffle_slates = cfg.gail_negatives, cfg.shuffle_slates
        self.reward_form, self.alpha, self.clip = cfg.gail_reward, cfg.gail_alpha, cfg.gail_reward_clip
        self.rng = random.Random(f"{cfg.seed}:disc:{rank}")

    def policy_rewards(self, shown_rows, row_indices, choices, num_generations):
        """The discriminator's reward of each completion (shown_rows: the B prompts' rows as the
        policy saw them, training rows row_indices; choices: the B x G parsed options or None), and
        the valid choices queued as negatives. Returns (rewards, this rank's diagnostics for
        `step_metrics`: D of each valid choice, fresh, before D trains on it; D of the held-out
        humans' clicks; `position_counts`)."""
        rewards, d_policy, d_table = choice_rewards(self.model, shown_rows, choices, num_generations,
                                                    self.reward_form, self.alpha, self.clip)
        diagnostics = {"d_policy": d_policy, "d_heldout_human": self.heldout_human_d(),
                       "positions": position_counts(shown_rows, choices, d_table)}
        pairs = []
        for i, choice in enumerate(choices):
            if choice is not None:
                index, shown = row_indices[i // num_generations], shown_rows[i // num_generations]
                original = self.rows[index]["slate_items_json"]
                order = [original.index(item) for item in shown["slate_items_json"]]
                pairs.append(Pair.displayed(index, choice, order))
        self.add_policy_pairs(pairs)
        return rewards, diagnostics

    def heldout_human_d(self):
        """D of the held-out humans' own clicks (a human pair scores > 0.5 when D is right)."""
        if not self.heldout:
            return []
        with torch.no_grad():
            table = self.model(self.heldout)
        clicks = torch.tensor([row["gold_index"] - 1 for row in self.heldout], device=table.device)
        return torch.sigmoid(table[torch.arange(len(self.heldout)), clicks]).tolist()

    def add_policy_pairs(self, pairs):
        """Keep the policy's valid choices (all of them, or with GAIL_NEGATIVES=wrong only those that
        differ from the human's, as upstream) in a first-in first-out buffer."""
        if self.negatives == "wrong":  # the human's click, wherever the policy was shown it
            pairs = [p for p in pairs if (p.order[p.option - 1] + 1 if p.order else p.option)
                     != self.rows[p.row]["gold_index"]]
        self.buffer = (self.buffer + list(pairs))[-self.buffer_size:]

    def sample(self):
        n_human = round(self.batch_size * self.human_fraction) if self.buffer else self.batch_size
        humans = [self.human_pair(self.rng.randrange(len(self.rows))) for _ in range(n_human)]
        policy = [self.rng.choice(self.buffer) for _ in range(self.batch_size - n_human)] if self.buffer else []
        return humans, policy

    def human_pair(self, i):
        """Row i's click, shown as the policy is shown its slates: with shuffle_slates under a random
        permutation (this trainer's seeded RNG), else D could tell people from the policy by the slot
        alone, humans clicking the original order's positions and the policy shuffled ones."""
        if not self.shuffle_slates:
            return Pair(i, self.rows[i]["gold_index"])
        order, gold = data.shuffled_order(self.rows[i], self.rng)
        return Pair.displayed(i, gold, order)

    def step(self):
        """One update on a mixed batch; returns its statistics."""
        humans, policy = self.sample()
        pairs = humans + policy
        encoded = self.model.encode_rows([p.shown(self.rows) for p in pairs])
        state_embeds = None
        if self.gradient_penalty:
            state_embeds = self.model.encoder.embed_tokens(encoded[0][0]).detach().requires_grad_()
        # The penalty differentiates twice; the fused attention kernels have no double backward.
        with sdpa_kernel(SDPBackend.MATH) if self.gradient_penalty else nullcontext():
            table = self.model.score_table(encoded, state_embeds)
        logits = table[torch.arange(len(pairs)), torch.tensor([p.option - 1 for p in pairs])]
        labels = torch.tensor([1.0] * len(humans) + [0.0] * len(policy), device=logits.device)
        targets = labels * (1 - self.label_smoothing) + (1 - labels) * self.label_smoothing
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        if self.gradient_penalty:  # R1: the gradient norm on human states' input embeddings
            (grad,) = torch.autograd.grad(logits[: len(humans)].sum(), state_embeds, create_graph=True)
            loss = loss + self.gradient_penalty * grad[: len(humans)].pow(2).sum(dim=(1, 2)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        average_gradients(self.model)
        self.optimizer.step()
        with torch.no_grad():
            d = torch.sigmoid(logits.detach())
            entropy = -(d * d.clamp_min(1e-12).log() + (1 - d) * (1 - d).clamp_min(1e-12).log()).mean()
        return {"loss": loss.item(), "human_d": d[: len(humans)].tolist(), "policy_d": d[len(humans):].tolist(),
                "entropy": entropy.item()}

    def state_dict(self):
        """Weights and optimizer (tensors, for torch.save) ..."""
        return {"disc": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def extra_state(self):
        """... and the buffer and sampling RNG (JSON)."""
        version, internal, gauss = self.rng.getstate()
        return {"buffer": [[p.row, p.option, p.order] for p in self.buffer], "rng": [version, list(internal), gauss]}

    def load(self, state, extra):
        self.model.load_state_dict(state["disc"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffer = [Pair(*p) for p in extra["buffer"]]
        if extra["rng"] is not None:  # a rank the checkpoint did not have keeps its fresh sampler
            version, internal, gauss = extra["rng"]
            self.rng.setstate((version, tuple(internal), gauss))


def average_gradients(module):
    """Mean of every rank's gradients, so replicated discriminators stay identical."""
    if not dist.is_initialized():
        return
    world = dist.get_world_size()
    for p in module.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world



def step_metrics(diagnostics, updates):
    """Discriminator statistics of a step over every rank: diagnostics, each rank's from
    `policy_rewards` (scored before this step's updates); updates, the statistics of every `step`
    call. `acc_*` are on the pairs D trained on; `heldout_acc` is its balanced accuracy on the
    held-out humans' clicks against this step's fresh policy choices, near 0.5 when it cannot tell
    them apart (caught up: the policy looks human; or fallen behind) and near 1 when it can."""
    human = [d for u in updates for d in u["human_d"]]
    policy = [d for u in updates for d in u["policy_d"]]
    d_policy = [d for diag in diagnostics for d in diag["d_policy"]]
    heldout = [d for diag in diagnostics for d in diag["d_heldout_human"]]
    out = {"disc/loss": statistics.mean(u["loss"] for u in updates) if updates else None,
           "disc/acc_human": statistics.mean(d > 0.5 for d in human) if human else None,
           "disc/acc_policy": statistics.mean(d < 0.5 for d in policy) if policy else None,
           "disc/mean_d_policy": statistics.mean(d_policy) if d_policy else None,
           "disc/entropy": statistics.mean(u["entropy"] for u in updates) if updates else None,
           "disc/heldout_acc_human": statistics.mean(d > 0.5 for d in heldout) if heldout else None,
           "disc/fresh_acc_policy": statistics.mean(d < 0.5 for d in d_policy) if d_policy else None}
    if heldout and d_policy:
        out["disc/heldout_acc"] = (out["disc/heldout_acc_human"] + out["disc/fresh_acc_policy"]) / 2
    totals = {}
    for diag in diagnostics:
        for k, cell in diag["positions"].items():
            total = totals.setdefault(k, [0, 0, 0.0, 0])
            for i, value in enumerate(cell):
                total[i] += value
    humans, choices = sum(t[0] for t in totals.values()), sum(t[1] for t in totals.values())
    for k, (human_clicks, policy_choices, d_sum, states) in sorted(totals.items()):
        out[f"disc/pos{k}/human_share"] = human_clicks / humans if humans else None
        out[f"disc/pos{k}/policy_share"] = policy_choices / choices if choices else None
        out[f"disc/pos{k}/mean_d"] = d_sum / states
    return out
