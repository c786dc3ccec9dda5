"""Scratch comparison with TRL's GRPOTrainer on the same model, data and settings as bench/steps.py
(2 gun-control prompts x 4 generations, 32 new tokens, the upstream <think> prompt, TRL defaults
otherwise). TRL is not a dependency: run this in a scratch copy of the environment.

    cp -r .venv /tmp/trlvenv && /tmp/trlvenv/bin/python -m pip install --no-deps trl==1.16.0
    /tmp/trlvenv/bin/python -m bench.trl_compare BETA        # from the repository root; BETA: 0 or 0.04

Prints the seconds of each of 3 steps (the first includes warm-up) and the peak RSS.
"""
import json
import resource
import sys
import time

from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

import checkpoint
import data
import distributed
import errors
import prompts


class StepTimer(TrainerCallback):
    def __init__(self):
        self.start, self.times = None, []

    def on_step_begin(self, *args, **kwargs):
        self.start = time.time()

    def on_step_end(self, *args, **kwargs):
        self.times.append(time.time() - self.start)


def main(beta):
    path = checkpoint.resolve_model(checkpoint.EMBEDDED_MODEL, distributed.single_process())
    rows, _ = data.load_examples(str(data.DATA_DIR / "gun_control.jsonl"), 0.1, 42, log=lambda msg: None)
    dataset_rows = [{"prompt": prompts.build_messages(row, prompts.SYSTEM_PROMPT, 12), "gold": row["gold_index"]}
               for row in rows[:2]]  # the same two prompts as bench/steps.py

    def accuracy(completions, gold, **kwargs):  # the reward's value does not change the step's cost
        return [float(f"<answer>{g}</answer>" in str(c)) for c, g in zip(completions, gold)]

    args = GRPOConfig(output_dir="/tmp/bench_trl", per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=32, max_steps=3, beta=beta, report_to=[], save_strategy="no",
                      use_cpu=True, bf16=False, shuffle_dataset=False, logging_steps=1)
    timer = StepTimer()
    GRPOTrainer(model=path, reward_funcs=accuracy, args=args, train_dataset=Dataset.from_list(dataset_rows * 8),
                processing_class=AutoTokenizer.from_pretrained(path), callbacks=[timer]).train()
    print(json.dumps({"beta": beta, "step_seconds": timer.times,
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}))


if __name__ == "__main__":
    errors.run(lambda argv: main(float(argv[0])), sys.argv[1:])
