"""Two discriminator updates on rank-specific policy pairs, run by test_disc.py under torchrun.

    python tests/disc_worker.py MODEL_DIR OUT_PREFIX
"""
import sys

import torch

import checkpoint
import data
import disc
import distributed
import train_grail as tg


def main(model_dir, out_prefix):
    world = distributed.setup(timeout_minutes=5)
    torch.manual_seed(1000 + world.rank)  # ranks differ in everything but what disc.build makes equal
    model = checkpoint.load_model(model_dir, world.device, trainable=False)
    rows, _ = data.load_examples("", 0.1, 0, log=lambda msg: None)
    cfg = tg.Config(gail_lr=1e-3, gail_buffer_size=64, gail_disc_batch=8, gail_label_smoothing=0.1,
                    gail_gradient_penalty=0.1, seed=3)
    trainer = disc.DiscriminatorTrainer(disc.build("", model, checkpoint.load_tokenizer(model_dir), world.device,
                                                   seed=3), rows[:40], cfg, world.rank)
    trainer.add_policy_pairs([disc.Pair(i, 1 + (i + world.rank) % rows[i]["n_options"]) for i in range(40)])
    for _ in range(2):
        trainer.step()
    torch.save(trainer.model.state_dict(), f"{out_prefix}.rank{world.rank}.pt")
    distributed.shutdown(wait_for_peers=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
