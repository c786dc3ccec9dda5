"""configurator.py and train_grail.parse_config: precedence of defaults, files, environment and
command line; recipes; clear errors for bad keys and values."""
import json
from pathlib import Path

import pytest

import train_grail as tg

ROOT = Path(__file__).resolve().parent.parent


def test_precedence_defaults_file_env_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 3.0e-5\ngrail_max_history: 4\nnum_generations: 6\n")
    cfg, ignored = tg.parse_config([f"--config={path}", "--num_generations=8"], {"GRAIL_MAX_HISTORY": "2"})
    assert (cfg.learning_rate, cfg.grail_max_history, cfg.num_generations) == (3e-5, 2, 8)
    assert cfg.max_steps == tg.Config().max_steps and ignored == []
    cfg, _ = tg.parse_config(["--config", str(path), "--grail_max_history=7"], {"GRAIL_MAX_HISTORY": "2"})
    assert cfg.grail_max_history == 7 and cfg.learning_rate == 3e-5


def test_gail_environment_variables(tmp_path):
    env = {"GAIL_USE": "1", "GAIL_WEIGHT": "0.3", "GAIL_ALPHA": "2", "GAIL_DISC_MODEL": "distilbert-base-uncased",
           "GAIL_LR": "3e-5", "GRAIL_MAX_HISTORY": "5"}
    cfg, _ = tg.parse_config([], env)
    assert (cfg.gail_use, cfg.gail_weight, cfg.gail_alpha, cfg.gail_disc_model, cfg.gail_lr, cfg.grail_max_history) \
        == (True, 0.3, 2.0, "distilbert-base-uncased", 3e-5, 5)
    assert tg.parse_config(["--gail_use=0"], env)[0].gail_use is False  # the command line wins


def test_json_config_lists_and_bools(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"reward_funcs": ["pure_accuracy_reward"], "reward_weights": [2],
                                "shuffle_slates": False}))
    cfg, _ = tg.parse_config([f"--config={path}", "--gradient_checkpointing=true"], {})
    assert cfg.reward_funcs == ["accuracy"] and cfg.reward_weights == [2.0]
    assert cfg.shuffle_slates is False and cfg.gradient_checkpointing is True


@pytest.mark.parametrize("argv, env, message", [
    (["--no_such_key=1"], {}, "unknown config key 'no_such_key'"),
    (["--max_steps=ten"], {}, "max_steps='ten': expected int"),
    (["--loss_type=ppo"], {}, "loss_type='ppo'"),
    (["--reward_weights=1,2,3"], {}, "same length"),
    (["--shuffle_slates=maybe"], {}, "not a boolean"),
    ([], {"GAIL_REWARD": "odds"}, "gail_reward='odds'"),
    (["--gail_negatives=some"], {}, "gail_negatives='some'"),
    (["--reward_funcs=calibration", "--reward_weights=1", "--scale_rewards=group"], {}, "scale_rewards=batch or none"),
    (["--reward_funcs=calibration", "--reward_weights=1", "--scale_rewards=batch", "--num_generations=2"], {},
     "num_generations must be >= 3"),
    (["--bc_steps=3", "--prompt_mode=think"], {}, "bc_steps needs prompt_mode=answer"),
    # values that generate, the optimizer or the split would reject later: before anything loads
    (["--temperature=0"], {}, "temperature=0.0: must be > 0"),
    (["--max_completion_length=0"], {}, "max_completion_length=0: must be >= 1"),
    (["--beta=-1"], {}, "beta=-1.0: must be >= 0"),
    (["--eval_max_rows=-1"], {}, "eval_max_rows=-1: must be >= 0"),
    (["--top_p=1.5"], {}, "top_p=1.5: must be > 0 and <= 1"),
    (["--bc_label_smoothing=1.5"], {}, "bc_label_smoothing=1.5: must be >= 0 and <= 1"),
    ([], {"GRAIL_MAX_HISTORY": "-3"}, "grail_max_history=-3: must be >= 0"),
    (["--prompts_per_step=3"], {"WORLD_SIZE": "2"}, "prompts_per_step=3 must divide by the 2 ranks"),
    (["--report_to=mlflow"], {}, "report_to=['mlflow']: choose from"),
    # typos and values that would run silently wrong
    ([], {"GRAIL_USE": "1"}, "unknown environment variable GRAIL_USE; known: GAIL_ALPHA"),
    ([], {"GAIL_WIEGHT": "0.3"}, "unknown environment variable GAIL_WIEGHT"),
    (["--top_p=nan"], {}, "top_p='nan': expected float ('nan' is not finite)"),
    ([], {"GAIL_ALPHA": "inf"}, "gail_alpha='inf': expected float ('inf' is not finite)"),
    (["--adam_beta2=1"], {}, "adam_beta2=1.0: each must be < 1"),
    (["--output_dir="], {}, "output_dir is empty"),
    (["--reward_funcs=", "--reward_weights="], {}, "GAIL off: every reward would be 0"),
    (["--reward_weights=0,0"], {}, "GAIL off: every reward would be 0"),
    (["--reward_weights=1,nan"], {}, "reward_weights='1,nan': expected list of float ('nan' is not finite)"),
    (["--reward_weights=1,abc"], {}, "reward_weights='1,abc': expected list of float (could not convert string"),
    ([], {"GAIL_ALPHA": "-1"}, "gail_alpha=-1.0: must be >= 0"),
    (["--beta=0.04", "--bc_steps=5", "--prompt_mode=answer"], {}, "the KL's reference would be the model before cloning"),
    (["--eval_views=shuffled"], {}, "original among them"),
    (["--eval_views=original,shuffled,original"], {}, "names a view twice"),
])
def test_bad_config_stops_with_a_clear_message(argv, env, message):
    with pytest.raises(SystemExit) as exit_:
        tg.parse_config(argv, env)
    line = str(exit_.value.code)
    assert line.startswith("[config] ") and message in line and "\n" not in line, line


def test_booleans_spelled_as_yaml_spells_them():
    for text, value in (("on", True), ("OFF", False), (" true ", True), ("Yes", True), ("0", False)):
        assert tg.parse_config([], {"GAIL_USE": text})[0].gail_use is value, text


def test_prompts_per_step_that_divides_by_the_ranks_passes():
    assert tg.parse_config(["--prompts_per_step=4"], {"WORLD_SIZE": "2"})[0].prompts_per_step == 4


def test_upstream_recipe_loads_with_one_warning_list():
    recipe = ROOT / "tests" / "fixtures" / "upstream_config_grail_gun.yaml"
    cfg, ignored = tg.parse_config([f"--config={recipe}"], {})
    assert cfg.dataset == "od2961/grail-gun" and cfg.reward_funcs == ["accuracy"]
    assert cfg.system_prompt.startswith("You are choosing EXACTLY ONE item") and cfg.max_steps == -1
    assert {"use_vllm", "kl_target", "per_device_train_batch_size", "hub_model_id"} <= set(ignored)
    assert cfg.report_to == ["wandb"]  # TRL's key, honoured (offline by default; stops up front without wandb)


def test_shipped_recipes_parse():
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        cfg, ignored = tg.parse_config([f"--config={recipe}"], {})
        assert ignored == [], recipe


@pytest.mark.parametrize("line, message", [
    ("max_steps: true", "max_steps=True: expected int (a boolean, True)"),
    ("learning_rate: yes", "learning_rate=True: expected float (a boolean, True)"),
    ("reward_funcs: [accuracy, [format]]", "a list of plain values, not nested ones"),
])
def test_yaml_values_of_the_wrong_kind_stop_with_a_clear_message(tmp_path, line, message):
    path = tmp_path / "c.yaml"
    path.write_text(line + "\n")
    with pytest.raises(SystemExit) as exit_:
        tg.parse_config([f"--config={path}"], {})
    assert str(exit_.value.code).startswith("[config] ") and message in str(exit_.value.code)


@pytest.mark.parametrize("name, text, message", [
    ("c.yaml", "seed: 7\nmax_steps: 3\nseed: 9\n", "c.yaml is not valid YAML at line 3, column 1: key 'seed'"),
    ("c.json", '{"seed": 7, "max_steps": 3, "seed": 9}', "c.json is not valid JSON: key 'seed'"),
])
def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path, name, text, message):
    """A recipe edited by adding a line below an old one would run the last value silently."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        tg.parse_config([f"--config={path}"], {})
    assert message in str(exit_.value.code) and "'seed' is given twice" in str(exit_.value.code)
    path.write_text(text.replace("seed: 9", "top_p: 0.5").replace('"seed": 9', '"top_p": 0.5'))
    assert tg.parse_config([f"--config={path}"], {})[0].seed == 7


def test_eval_only_takes_the_checkpoints_prompt_over_a_recipe_and_the_environment(tmp_path):
    """`./run.sh --eval_only=CKPT` on a CPU adds the CPU recipe: the checkpoint's prompt and its own
    output folder outrank that file and an exported GRAIL_MAX_HISTORY; the command line outranks all."""
    ckpt = tmp_path / "run" / "checkpoint-000004"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")  # a model folder, as far as the name check goes
    (ckpt / "trainer_state.json").write_text(json.dumps({"config": {
        "prompt_mode": "think", "grail_max_history": 12, "max_completion_length": 128, "seed": 7}}))
    argv = ["--config=recipes/cpu_default.yaml", f"--eval_only={ckpt}"]
    cfg, _ = tg.parse_config(argv, {"GRAIL_MAX_HISTORY": "4"})
    assert (cfg.prompt_mode, cfg.grail_max_history, cfg.max_completion_length, cfg.split_seed) == ("think", 12, 128, 7)
    assert cfg.output_dir.endswith("eval-run-checkpoint-000004") and cfg.cpu_bf16  # the recipe's speed settings
    cfg, _ = tg.parse_config(argv + ["--grail_max_history=3", "--output_dir=out/x"], {"GRAIL_MAX_HISTORY": "4"})
    assert (cfg.grail_max_history, cfg.output_dir) == (3, "out/x")
    # The recipe asks for the viewpoint in the question; a checkpoint from before that setting was
    # trained on upstream's question, and is scored on it.
    assert cfg.viewpoint_in_question is False
    (ckpt / "trainer_state.json").write_text(json.dumps({"config": {"prompt_mode": "answer",
                                                                     "viewpoint_in_question": True}}))
    assert tg.parse_config([f"--eval_only={ckpt}"], {})[0].viewpoint_in_question is True
    model = tmp_path / "model"  # a model that is not one of this trainer's checkpoints: the recipe decides
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert tg.parse_config(["--config=recipes/cpu_default.yaml", f"--eval_only={model}"], {})[0].viewpoint_in_question
