"""Overrides of a config dataclass's defaults, later sources winning: `--config=FILE` (YAML or JSON;
also `--config FILE`), the GAIL_*/GRAIL_* environment variables named after its fields (any other
such variable is a typo and stops the run), then `--key=value` (or `--key value`) arguments; a list
is `a,b` or `[a,b]`. Unknown keys, a key given twice in one file and malformed values stop the run
with a one-line message.
"""
import dataclasses
import json
import math
import typing
from pathlib import Path

ENV_PREFIXES = ("GAIL_", "GRAIL_")
# Variables with those prefixes that are not config keys but are read elsewhere (checkpoint.py,
# errors.py, run.sh); any other is a typo (GRAIL_USE for GAIL_USE) and stops the run.
OTHER_ENV = {"GRAIL_CACHE", "GRAIL_DEBUG", "GRAIL_LOCK_WAIT_SECONDS"}
CONFIG_FILE_ALIASES = {"dataset_name": "dataset"}
# Upstream/TRL recipe keys that mean nothing here: a recipe that sets them runs, with one warning.
FOREIGN_KEYS = {
    "torch_dtype", "attn_implementation", "dataset_train_split", "dataset_test_split",
    "dataset_prompt_column", "dataset_solution_column", "max_prompt_length", "use_vllm", "do_eval",
    "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_checkpointing_kwargs",
    "lr_scheduler_type", "save_strategy", "evaluation_strategy", "eval_strategy",
    "logging_strategy", "logging_steps", "log_level", "log_completions", "kl_target",
    "init_kl_coeff", "kl_horizon", "kl_ctl_step_size", "clip_range", "clip_range_vf", "vf_coef",
    "reward_normalization", "gamma", "gae_lambda", "advantage_normalization", "reward_clip",
    "advantage_clip", "log_kl_per_token", "log_grad_norm_after_clip", "push_to_hub", "hub_model_id",
    "hub_strategy", "vllm_mode", "vllm_gpu_memory_utilization", "chat_template", "wandb_project",
    "wandb_entity", "run_name", "overwrite_output_dir", "callbacks", "benchmarks", "use_liger_kernel",
}


def parse_value(kind, text):
    """A command-line/environment string or a YAML/JSON value as the field's type; a `list[float]`
    field's items are read and checked as floats are."""
    if typing.get_origin(kind) is list:
        (item_kind,) = typing.get_args(kind)
        return [parse_value(item_kind, item) for item in parse_value(list, text)]
    value = _parsed(kind, text)
    if kind is float and not math.isfinite(value):  # NaN passes every range comparison
        raise ValueError(f"{text!r} is not finite")
    return value


def kind_name(kind):
    """`float`, `list`, `list of float`: a field's type as a message names it."""
    args = typing.get_args(kind)
    return f"list of {args[0].__name__}" if args else kind.__name__


def _parsed(kind, text):
    if isinstance(text, str):
        if kind is bool:  # YAML 1.1's spellings, as a recipe file reads them
            if text.strip().lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(f"not a boolean: {text!r}")
            return text.strip().lower() in ("1", "true", "yes", "on")
        if kind is list:  # a,b or [a,b] (the YAML spelling), items optionally quoted
            inner = text.strip()
            inner = inner[1:-1] if inner.startswith("[") and inner.endswith("]") else inner
            return [part.strip().strip("'\"") for part in inner.split(",") if part.strip().strip("'\"")]
        return kind(text)
    if isinstance(text, bool) and kind is not bool:  # YAML's yes/true where a number is expected
        raise ValueError(f"a boolean, {text!r}")
    if kind is float and isinstance(text, int):
        return float(text)
    if kind is bool and isinstance(text, int):
        return bool(text)
    if not isinstance(text, kind):
        raise ValueError(f"expected {kind.__name__}, got {text!r}")
    if kind is list and any(isinstance(item, (list, dict)) for item in text):
        raise ValueError("a list of plain values, not nested ones")
    return text


def apply_overrides(config_class, argv, environ, pinned=None):
    """(an instance of config_class with every override applied, the ignored recipe keys). `pinned`
    values outrank the config file and the environment; only the command line overrides them."""
    kinds = {f.name: f.type for f in dataclasses.fields(config_class)}
    values, ignored = {}, []
    args = joined_arguments(argv)
    for arg in args:
        if arg.startswith("--config="):
            values.update(read_config_file(arg.split("=", 1)[1], kinds, ignored))
    for name in kinds:
        env_name = name.upper()
        if env_name.startswith(ENV_PREFIXES) and env_name in environ:
            values[name] = environ[env_name]
    values.update({key: value for key, value in (pinned or {}).items() if key in kinds})
    unknown = sorted(n for n in environ if n.startswith(ENV_PREFIXES) and n not in OTHER_ENV
                     and n.lower() not in kinds)
    if unknown:
        known = sorted(n.upper() for n in kinds if n.upper().startswith(ENV_PREFIXES)) + sorted(OTHER_ENV)
        raise SystemExit(f"[config] unknown environment variable {', '.join(unknown)}; known: {', '.join(known)}")
    for arg in args:
        if arg.startswith("--config="):
            continue
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"[config] arguments are --key=value or --key value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        key = key.lower()
        if key not in kinds:
            raise SystemExit(f"[config] unknown config key {key!r}; known: {', '.join(sorted(kinds))}")
        values[key] = value
    parsed = {}
    for key, value in values.items():
        try:
            parsed[key] = parse_value(kinds[key], value)
        except (TypeError, ValueError) as err:
            raise SystemExit(f"[config] {key}={value!r}: expected {kind_name(kinds[key])} ({err})") from None
    return config_class(**parsed), ignored


def joined_arguments(argv):
    """`--key value` as `--key=value`, for every key alike."""
    args, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--") and "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            args.append(f"{arg}={argv[i + 1]}")
            i += 2
        else:
            args.append(arg)
            i += 1
    return args


def read_config_file(path, kinds, ignored):
    import yaml  # comes with transformers

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise SystemExit(f"[config] cannot read {path}: {err.strerror or err}") from None
    try:
        loaded = json.loads(text, object_pairs_hook=_unique_keys) if path.endswith(".json") else \
            yaml.load(text, Loader=_unique_key_loader(yaml))
    except (ValueError, yaml.YAMLError) as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SystemExit(f"[config] {path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}{at}: "
                         f"{problem}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise SystemExit(f"[config] {path}: expected key: value pairs, got a {type(loaded).__name__}")
    out = {}
    for key, value in (loaded or {}).items():
        key = CONFIG_FILE_ALIASES.get(key, key)
        if key in kinds:
            out[key] = value
        elif key in FOREIGN_KEYS:
            ignored.append(key)
        else:
            raise SystemExit(f"[config] {path}: unknown config key {key!r}")
    return out


def _repeated(keys):
    """The index of the first key that an earlier one repeats, or None."""
    return next((i for i, key in enumerate(keys) if key in keys[:i]), None)


def _unique_keys(pairs):
    """A JSON object as a dict, a key given twice refused (json.loads would keep the last silently)."""
    twice = _repeated([key for key, _ in pairs])
    if twice is not None:
        raise ValueError(f"key {pairs[twice][0]!r} is given twice")
    return dict(pairs)


def _unique_key_loader(yaml):
    """PyYAML's safe loader, refusing a key given twice in one mapping: in a recipe that is an edit
    gone wrong (`bc_steps: 100` added below `bc_steps: 70`), and safe_load would keep the last silently."""
    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
            twice = _repeated(keys)
            if twice is not None:
                raise yaml.constructor.ConstructorError(None, None, f"key {keys[twice]!r} is given twice",
                                                        node.value[twice][0].start_mark)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def check_ranges(config, ranges):
    """Stop with one line when a value is outside its range; `ranges`: {key: (low, high or None,
    whether low itself is allowed)}."""
    for key, (low, high, low_allowed) in ranges.items():
        value = getattr(config, key)
        if value < low or (value == low and not low_allowed) or (high is not None and value > high):
            bound = f"{'>=' if low_allowed else '>'} {low}" + (f" and <= {high}" if high is not None else "")
            raise SystemExit(f"[config] {key}={value}: must be {bound}")
