"""Two discriminator updates on rank-specific policy pairs, run by test_disc.py under torchrun.

    python tests/disc_worker.py MODEL_DIR OUT_PREFIX
"""
import sys

import torch

import data
import disc
import train_grail as tg


def main(model_dir, out_prefix):
    ctx = tg.setup_distributed(timeout_minutes=5)
    torch.manual_seed(1000 + ctx.rank)  # ranks differ in everything but what disc.build makes equal
    model = tg.load_model(model_dir, ctx.device, trainable=False)
    rows, _ = data.load_examples("", 0.1, 0, log=lambda msg: None)
    trainer = disc.Trainer(disc.build("", model, tg.load_tokenizer(model_dir), ctx.device, seed=3), rows[:40],
                           lr=1e-3, buffer_size=64, human_fraction=0.5, batch_size=8, label_smoothing=0.1,
                           gradient_penalty=0.1, negatives="all", seed=3, rank=ctx.rank)
    trainer.add_policy_pairs([disc.Pair(i, 1 + (i + ctx.rank) % rows[i]["n_options"]) for i in range(40)])
    for _ in range(2):
        trainer.step()
    torch.save(trainer.disc.state_dict(), f"{out_prefix}.rank{ctx.rank}.pt")
    tg.shutdown_distributed(wait_for_peers=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
