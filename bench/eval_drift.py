"""Does the exact evaluation slow down after cloning, in the same process? (a script, not a test)

    python -m bench.eval_drift [--rows=24] [--bc_steps=25] [--runs=3] [--model=PATH_OR_ID] [--threads=N]

The default job scores the untrained model, clones, then scores again in one process; its final
evaluation has run 1.3-1.7x longer than its first. This measures that in one run: the bf16 exact
evaluation of `rows` held-out rows `runs` times (bench.roofline.exact_phase, median rows/s), then
`bc_steps` cloning steps of 2 rows (bench.roofline.cloning_phase: the recipe's targets at a learning
rate of 1e-12, so the weights stay put and only the process changes), then the evaluation again;
it prints both rates and their ratio, measured on the same machine minutes apart.
"""
import statistics
import sys

import checkpoint
import data
import errors
import prompts
import rollout
from bench.roofline import cloning_phase, exact_phase, machine
from bench.steps import parse_options, trainable_model


def run(args):
    world, model, tokenizer = trainable_model(args)
    train_rows, val_rows = data.load_examples("", 0.1, 42, log=lambda msg: None)
    prompt = prompts.PromptFormat("answer")
    rows, bc_rows = val_rows[:args["rows"]], train_rows[:2 * (args["bc_steps"] + 1)]
    texts, bc_texts = ([prompt.text(tokenizer, r) for r in some] for some in (rows, bc_rows))
    stop_ids = rollout.stop_token_ids(model, tokenizer)

    def evaluation_rate():
        model.eval()
        return statistics.median(exact_phase(model, tokenizer, texts, rows, stop_ids, True, world.device)[0]
                                 for _ in range(args["runs"]))

    before = evaluation_rate()
    cloning = cloning_phase(model, tokenizer, bc_texts, bc_rows, train_rows, args["bc_steps"], True, world)[0]
    after = evaluation_rate()
    return {"machine": machine(world.device), "before": before, "cloning_rows_per_s": cloning, "after": after,
            "bc_steps": args["bc_steps"]}


def table(result):
    return (f"Machine: {result['machine']}\n\n| exact evaluation, bf16 | rows/s (median) |\n|---|---|\n"
            f"| before cloning | {result['before']:.2f} |\n"
            f"| after {result['bc_steps']} cloning steps ({result['cloning_rows_per_s']:.2f} rows/s) | "
            f"{result['after']:.2f} |\n| after / before | {result['after'] / result['before']:.2f} |")


def main(argv):
    print(table(run(parse_options(argv, {"rows": 24, "bc_steps": 25, "runs": 3, "model": checkpoint.EMBEDDED_MODEL,
                                         "threads": 0}))))


if __name__ == "__main__":
    errors.run(main, sys.argv[1:])
