"""The checks a training config passes before anything compiles.

`validate(config, device_count=..., dataset_features=..., num_records=..., image_sizes=...)`
raises one `ConfigError` listing every problem: unknown or missing fields and wrong types
(against `config.schema.SCHEMA`), values out of range (the method options' own declarations,
`objectives.terms.Option`), unknown names, impossible meshes and batch splits, references a
method cannot use; and, once the data is known, record fields the dataset lacks (the method's
`engine.scoring.ScoringPlan.record_fields`), a step count the epochs cannot feed and a
preprocessing size the model's vision tower does not take. `problems` returns the list.

Run length: ``train.num_steps`` optimizer steps, each one batch of ``data.batch_size``; 0 means
``data.num_epochs`` passes over the training split (`epoch_steps`), resolved when its size is
known. An epoch is the pipeline's schedule (`data.schedule.Schedule`): ``ceil(N / batch)``
batches, the last one padded (``data.drop_remainder=False``, the default [our choice]: every
record is trained on every epoch, and the short batch's loss is the mean over its real rows), or
``floor(N / batch)`` with the remainder dropped (a new permutation each epoch drops other
records). An on-policy method (FiSAO) reads ``batch_size / rollout.num_samples`` prompts per
step from an endless stream: ``ceil(epochs * N / prompts)`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

from mmpo_jax.config import benchmarks
from mmpo_jax.config.schema import (METHOD_CORE, OPTIONAL_SECTIONS, SCHEMA, Required,
                                    method_option_defaults)
from mmpo_jax.data.builders import BUILDERS
from mmpo_jax.data.image_processing import IMAGE_ASPECT_RATIOS
from mmpo_jax.data.row_encoding import TOO_LONG_POLICIES
from mmpo_jax.data.schedule import Schedule
from mmpo_jax.data.template import TEMPLATES
from mmpo_jax.engine import distributed, reference
from mmpo_jax.engine.scoring import plan_scoring
from mmpo_jax.engine.sharding import MESH_AXES
from mmpo_jax.models.lora import LLAMA_LINEAR_NAMES
from mmpo_jax.objectives import registry
from mmpo_jax.pipelines.p2dpo import PairSettings
from mmpo_jax.rewards.fisao import REWARD_GRANULARITIES

PRESETS = ("tiny", "tiny_v2", "llava_1_5_7b", "llava_1_5_13b")  # mmpo_jax.models.presets
INITS = ("sft_base", "random", "checkpoint")
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "constant", "linear")
ROLLOUT_VOCABULARIES = ("shapes_world", "coco")
SHAPES_WORLD = "shapes_world"

_CHOICES = {
    "model.preset": PRESETS, "model.init": INITS, "model.dtype": DTYPES,
    "model.param_dtype": DTYPES, "data.dataset": tuple(BUILDERS), "data.template": tuple(TEMPLATES),
    "optimizer.schedule": SCHEDULES, "reference.mode": reference.MODES,
    "rollout.reward_granularity": REWARD_GRANULARITIES,
    "rollout.vocabulary": ROLLOUT_VOCABULARIES, "data.too_long": TOO_LONG_POLICIES,
    "data.image_aspect_ratio": ("", *IMAGE_ASPECT_RATIOS),
}
_POSITIVE = (
    "model.lora.rank", "data.batch_size", "optimizer.learning_rate", "optimizer.eps",
    "optimizer.grad_accum_steps", "train.log_every", "checkpoint.save_every",
    "checkpoint.keep", "eval.batch_size", "eval.max_new_tokens", "eval.control_learning_rate",
    "sft_base.num_steps", "sft_base.batch_size", "sft_base.learning_rate", "rollout.num_samples",
    "rollout.max_new_tokens", "rollout.ppo_epochs", "train.max_bad_steps",
)
_RANGES = {  # inclusive bounds, None = open
    "model.lora.dropout": (0.0, 1.0), "data.max_length": (0, None), "data.num_epochs": (0, None),
    "optimizer.warmup_ratio": (0.0, 1.0), "optimizer.end_learning_rate_ratio": (0.0, 1.0),
    "optimizer.weight_decay": (0.0, None), "optimizer.b1": (0.0, 1.0), "optimizer.b2": (0.0, 1.0),
    "optimizer.grad_clip": (0.0, None), "eval.num_captions": (0, None),
    "eval.num_samples": (0, None), "train.num_steps": (0, None), "data.image_size": (0, None),
    "sft_base.vision_steps": (0, None),
    "sft_base.vision_batch_size": (0, None),
}


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem, one per line. The CLIs print
    it without a traceback and exit with status 2."""


def samples_rollouts(method_config: Mapping[str, Any]) -> bool:
    """Whether the method's responses are samples of the policy (an on-policy method)."""
    return any(score.response.from_rollouts for score in registry.required_scores(method_config))


def validate(config: Any, *, device_count: int | None = None,
             dataset_features: Collection[str] | None = None, num_records: int | None = None,
             process_count: int = 1, image_sizes: tuple[int, int] | None = None) -> None:
    """Checks a full config (ConfigDict or nested dicts); raises one error listing every problem.

    Args:
      config: the experiment config (`SCHEMA`).
      device_count: devices the mesh spans; None skips the checks that need it.
      dataset_features: record fields of the training split; None skips the data check.
      num_records: records of the training split; None skips the run-length check.
      process_count: processes the data is sharded over (the run-length check).
      image_sizes: ``(preprocessing crop size, the model's vision image size)`` in pixels;
        None skips the image-size check.

    Raises:
      ConfigError: the problems, one per line.
    """
    found = problems(config, device_count=device_count, dataset_features=dataset_features,
                     num_records=num_records, process_count=process_count,
                     image_sizes=image_sizes)
    if found:
        raise ConfigError(format_problems(config, found))


def distributed_settings(config: Any) -> distributed.Settings:
    """The ``distributed`` section of ``config`` (``engine.distributed.initialize`` starts the
    processes from it, before the device count the other checks need is known).

    Raises:
      ConfigError: the section's problems.
    """
    section = plain(config).get("distributed")
    if not isinstance(section, Mapping) or set(section) != set(SCHEMA["distributed"]):
        raise ConfigError(format_problems(config, [
            f"distributed: expected the fields {sorted(SCHEMA['distributed'])}, got {section!r}"]))
    settings = distributed.Settings(**section)
    found = settings.problems()
    if found:
        raise ConfigError(format_problems(config, found))
    return settings


def format_problems(config: Any, found: list[str]) -> str:
    """The message of `ConfigError`: the config's name, then one problem per line."""
    tree = plain(config)
    name = tree.get("name") if isinstance(tree, Mapping) else None
    return f"config {name!r} is invalid:\n  - " + "\n  - ".join(found)


def problems(config: Any, *, device_count: int | None = None,
             dataset_features: Collection[str] | None = None, num_records: int | None = None,
             process_count: int = 1, image_sizes: tuple[int, int] | None = None) -> list[str]:
    """`validate`'s problems as a list (empty when the config is valid)."""
    tree = plain(config)
    found = structure_problems(tree)
    if found:
        return found
    method_problems = _method_problems(tree["method"])
    found = [*_value_problems(tree), *method_problems,
             *_mesh_and_batch_problems(tree, device_count), *_pairs_problems(tree),
             *distributed.Settings(**tree["distributed"]).problems(),
             *benchmarks.problems(tree)]
    if not method_problems:
        found += _reference_problems(tree) + _rollout_problems(tree) + _run_problems(tree)
        if dataset_features is not None:
            found += _data_problems(tree, dataset_features)
        if num_records is not None and not found:
            found += _epoch_problems(tree, num_records, process_count)
    if image_sizes is not None:
        found += image_size_problems(tree, *image_sizes)
    return found


def epoch_steps(config: Any, num_records: int, *, process_count: int = 1) -> int:
    """Optimizer steps of ``data.num_epochs`` passes over ``num_records`` (module doc).

    Raises:
      ValueError: ``data.drop_remainder`` leaves no full batch.
    """
    tree = plain(config)
    epochs, batch = int(tree["data"]["num_epochs"]), int(tree["data"]["batch_size"])
    if samples_rollouts(tree["method"]):
        prompts = batch // int(tree["rollout"]["num_samples"])
        return math.ceil(epochs * num_records / prompts)
    schedule = Schedule(num_records=num_records, shard_index=0, shard_count=process_count,
                        batch_size=batch // process_count, seed=0,
                        drop_remainder=bool(tree["data"]["drop_remainder"]))
    return epochs * schedule.batches_per_epoch


def _run_problems(tree: Mapping[str, Any]) -> list[str]:
    """What the main job and the loops refuse once data and model are loaded."""
    data, model, method = tree["data"], tree["model"], tree["method"]
    world = (tree.get("pairs", {}).get("source_dataset", SHAPES_WORLD)
             if data["dataset"] == "p2dpo_pairs" else data["dataset"])
    found = []
    if tree["train"]["num_steps"] == 0 and data["num_epochs"] == 0:
        found.append("train.num_steps=0 takes the run's length from data.num_epochs, which is 0 "
                     "(repeat the data forever); set train.num_steps=N or data.num_epochs=E")
    if model["init"] == "sft_base" and world != SHAPES_WORLD:
        found.append(f"model.init='sft_base' trains the tiny SFT base on the shapes world, not "
                     f"{world!r}; set model.init='checkpoint' (with model.checkpoint) or 'random'")
    if model["lora"]["enabled"] and not model["freeze_vision"]:
        found.append("model.lora.enabled=true with model.freeze_vision=false: the adapters cover "
                     "the language model only; set model.freeze_vision=true, or "
                     "model.lora.enabled=false to train the vision tower in full")
    if samples_rollouts(method) and data["dataset"] != SHAPES_WORLD:
        found.append(f"method {method['name']!r} on data.dataset={data['dataset']!r}: its "
                     "verifier and calibration are built from the shapes world's ground truth "
                     "only; train it on shapes_world, or call training.fisao_loop.train_fisao "
                     "with verifier= and calibration=")
    if tree["eval"]["enabled"] and world != SHAPES_WORLD:
        found.append(f"eval.enabled=true evaluates on the shapes world's "
                     f"{tree['eval']['caption_split']!r}/{tree['eval']['pope_split']!r} splits, "
                     f"which {world!r} lacks; set eval.enabled=false and evaluate with "
                     "python -m mmpo_jax.evaluate")
    return found


def _epoch_problems(tree: Mapping[str, Any], num_records: int, process_count: int) -> list[str]:
    data, steps = tree["data"], tree["train"]["num_steps"]
    try:
        available = epoch_steps(tree, num_records, process_count=process_count)
    except ValueError:
        return [f"data.drop_remainder=true leaves no full batch of data.batch_size="
                f"{data['batch_size']} in the {num_records} records of {data['dataset']}/"
                f"{data['split']}; lower data.batch_size or set data.drop_remainder=false"]
    if steps and data["num_epochs"] and steps > available and not samples_rollouts(tree["method"]):
        return [f"train.num_steps={steps} needs {steps} batches, but data.num_epochs="
                f"{data['num_epochs']} over the {num_records} records of {data['dataset']}/"
                f"{data['split']} gives {available} (data.batch_size={data['batch_size']}, "
                f"data.drop_remainder={data['drop_remainder']}); set train.num_steps=0 to train "
                f"for data.num_epochs, or raise data.num_epochs (0 repeats the data forever)"]
    return []


def image_size_problems(config: Any, preprocessing: int, model: int) -> list[str]:
    """Why images preprocessed to ``preprocessing`` px cannot feed a vision tower taking
    ``model`` px (empty when the sizes agree)."""
    tree = plain(config)
    if preprocessing == model:
        return []
    model_config = tree["model"]
    where = (f"model.checkpoint={model_config['checkpoint']!r}"
             if model_config["init"] == "checkpoint"
             else f"model.preset={model_config['preset']!r}")
    return [f"the images of data.dataset={tree['data']['dataset']!r} are preprocessed to "
            f"{preprocessing} px but the vision tower of {where} takes {model} px; set "
            f"data.image_size={model}, or use a model (preset or checkpoint) whose vision tower "
            f"takes {preprocessing}-px images"]


def plain(value: Any) -> Any:
    """A config (ConfigDict or mappings) as nested plain dicts."""
    value = value.to_dict() if hasattr(value, "to_dict") else value
    return {k: plain(v) for k, v in value.items()} if isinstance(value, Mapping) else value


def _get(tree: Mapping[str, Any], path: str) -> Any:
    for part in path.split("."):
        tree = tree.get(part) if isinstance(tree, Mapping) else None
    return tree


_TYPE_CHECKS = {
    bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    tuple: lambda v: isinstance(v, (tuple, list)), dict: lambda v: isinstance(v, Mapping),
}


def _field_problems(parent: Mapping[str, Any], key: str, spec: Any, path: str) -> list[str]:
    if key not in parent:
        return [f"{path}: missing"]
    value = parent[key]
    expected = spec.type if isinstance(spec, Required) else type(spec)
    if value is None:
        return [f"{path}: not set; expected a {expected.__name__}"]
    if not _TYPE_CHECKS[expected](value):
        return [f"{path}={value!r}: expected a {expected.__name__}"]
    if not isinstance(spec, dict) or not spec:
        return []
    problems = [f"{path}.{k}: unknown field; valid fields of {path}: {sorted(spec)}"
                for k in sorted(set(value) - set(spec))]
    for k, sub in spec.items():
        problems += _field_problems(value, k, sub, f"{path}.{k}")
    return problems


def structure_problems(tree: Mapping[str, Any]) -> list[str]:
    """Unknown, missing and mistyped fields of a `plain` config (the other checks need none)."""
    valid = [*SCHEMA, "method", *OPTIONAL_SECTIONS]
    problems = [f"{key}: unknown section or field; valid: {valid}"
                for key in tree if key not in valid]
    for key, spec in SCHEMA.items():
        problems += _field_problems(tree, key, spec, key)
    for key, spec in OPTIONAL_SECTIONS.items():
        if key in tree:
            problems += _field_problems(tree, key, spec, key)
    method = tree.get("method")
    if not isinstance(method, Mapping):
        return [*problems, f"method: missing or not a mapping ({method!r})"]
    known = {**METHOD_CORE, **method_option_defaults()}
    for key, value in method.items():
        if key not in known:
            problems.append(f"method.{key}: unknown field; valid fields of method: {sorted(known)}")
        elif value is not None or key not in ("terms", "token_weights"):  # None: the defaults
            problems += _field_problems(method, key, known[key], f"method.{key}")
    return problems + ([] if "name" in method else ["method.name: missing"])


def _method_problems(method: Mapping[str, Any]) -> list[str]:
    try:
        registry.required_scores(method)
    except (TypeError, ValueError) as error:
        return [f"method: {error}"]
    return []


def _value_problems(tree: Mapping[str, Any]) -> list[str]:
    problems = [f"{path}={_get(tree, path)!r} is not one of {choices}"
                for path, choices in _CHOICES.items()
                if _get(tree, path) is not None and _get(tree, path) not in choices]
    problems += [f"{path}={_get(tree, path)!r} must be > 0" for path in _POSITIVE
                 if _get(tree, path) is not None and not _get(tree, path) > 0]
    for path, (low, high) in _RANGES.items():
        value = _get(tree, path)
        if value is None:
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            upper = "inf" if high is None else high
            problems.append(f"{path}={value!r} must lie in [{low}, {upper}]")
    options = registry.option_declarations()
    for key, value in tree["method"].items():
        if key in options and value is not None:
            problems += options[key].problems(f"method.{key}", value)
    buckets, max_length = tuple(tree["data"]["buckets"]), tree["data"]["max_length"]
    if not _increasing(buckets):
        problems.append(f"data.buckets={buckets} must be positive and strictly increasing")
    elif max_length > buckets[-1]:
        problems.append(f"data.max_length={max_length} exceeds the largest bucket {buckets[-1]}")
    sft_buckets = tuple(tree["sft_base"]["buckets"])
    if sft_buckets and not _increasing(sft_buckets):
        problems.append(f"sft_base.buckets={sft_buckets} must be positive and strictly increasing "
                        "(or empty: data.buckets)")
    targets = [t for t in tree["model"]["lora"]["targets"] if t not in LLAMA_LINEAR_NAMES]
    if targets or not tree["model"]["lora"]["targets"]:
        problems.append(f"model.lora.targets: unknown {targets}; choose from {LLAMA_LINEAR_NAMES}")
    if tree["model"]["init"] == "checkpoint" and not tree["model"]["checkpoint"]:
        problems.append("model.init='checkpoint' needs model.checkpoint (an orbax directory "
                        "written by `python -m mmpo_jax.convert import`)")
    for rule in tree["mesh_rules"]:
        axes = () if len(rule) != 2 or rule[1] is None else rule[1]
        axes = (axes,) if isinstance(axes, str) else tuple(axes)
        if len(rule) != 2 or any(axis not in MESH_AXES for axis in axes):
            problems.append(f"mesh_rules entry {rule!r}: expected (logical_name, mesh axis | tuple "
                            f"of mesh axes | None) with mesh axes from {MESH_AXES}")
    return problems


def _increasing(buckets: tuple[int, ...]) -> bool:
    """Padded lengths a pipeline can bucket by: at least one, all positive, strictly increasing."""
    return bool(buckets) and all(b > 0 for b in buckets) and list(buckets) == sorted(set(buckets))


def _resolve_mesh(mesh: Mapping[str, int], device_count: int | None
                  ) -> tuple[dict[str, int] | None, list[str]]:
    """`sharding.make_mesh`'s sizes without building it: (sizes or None if unknown, problems)."""
    sizes = {axis: int(mesh[axis]) for axis in MESH_AXES}
    wildcards = [axis for axis, size in sizes.items() if size == -1]
    if any(size < 1 and size != -1 for size in sizes.values()) or len(wildcards) > 1:
        return None, [f"mesh {sizes}: sizes must be positive, with at most one -1"]
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if device_count is None:
        return (None if wildcards else sizes), []
    if wildcards and device_count % fixed:
        return None, [f"mesh {sizes}: {device_count} devices are not divisible by the fixed axes' "
                      f"product {fixed}"]
    if wildcards:
        sizes[wildcards[0]] = device_count // fixed
    elif fixed != device_count:
        return None, [f"mesh {sizes} has {fixed} slots but there are {device_count} devices; sizes "
                      "must multiply to the device count (or set one axis to -1)"]
    return sizes, []


def _mesh_and_batch_problems(tree: Mapping[str, Any], device_count: int | None) -> list[str]:
    sizes, problems = _resolve_mesh(tree["mesh"], device_count)
    batch, accum = tree["data"]["batch_size"], tree["optimizer"]["grad_accum_steps"]
    if accum > 0 and batch % accum:
        problems.append(f"data.batch_size={batch} is not divisible by "
                        f"optimizer.grad_accum_steps={accum}")
    if sizes is None or problems:
        return problems
    axes = dict(map(tuple, tree["mesh_rules"])).get("batch") or ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    parallel = math.prod(sizes.get(axis, 1) for axis in axes)  # unknown axes: reported above
    batches = {"micro-batch data.batch_size / optimizer.grad_accum_steps": batch // accum}
    if tree["model"]["init"] == "sft_base":
        batches["sft_base.batch_size"] = tree["sft_base"]["batch_size"]
    problems += [f"the {what} = {size} is not divisible by the data-parallel size {parallel} "
                 f"(mesh {sizes}, batch axes {axes}){_valid_accumulation(what, batch, parallel)}"
                 for what, size in batches.items() if size % parallel]
    return problems


def _valid_accumulation(what: str, batch: int, parallel: int) -> str:
    """For the micro-batch problem: the ``optimizer.grad_accum_steps`` that would fit, if any."""
    if not what.startswith("micro-batch"):
        return ""
    valid = [a for a in range(1, batch + 1) if batch % a == 0 and (batch // a) % parallel == 0]
    if not valid:
        return f"; data.batch_size={batch} must be a multiple of {parallel}"
    return (f"; valid optimizer.grad_accum_steps for data.batch_size={batch} on this mesh: "
            f"{', '.join(map(str, valid))}")


def _reference_problems(tree: Mapping[str, Any]) -> list[str]:
    mode, method, model = tree["reference"]["mode"], tree["method"], tree["model"]
    if samples_rollouts(method) and mode not in reference.ON_POLICY_MODES:
        return [f"reference.mode={mode!r}: an on-policy method's reference scores fresh samples "
                f"every step; use one of {reference.ON_POLICY_MODES}"]
    if mode == "lora_base":
        problems = []
        if not model["lora"]["enabled"]:
            problems.append("reference.mode='lora_base' (the policy with its adapters off) needs "
                            "model.lora.enabled=true; use reference.mode='copy' for full "
                            "fine-tuning")
        if model["train_projector"]:
            problems.append("reference.mode='lora_base' with model.train_projector=true: the "
                            "reference would move with the trained projector; set "
                            "model.train_projector=false (keeps lora_base) or "
                            "reference.mode='copy'")
        return problems
    return cache_problems(method) if mode == "cache" else []


def _pairs_problems(tree: Mapping[str, Any]) -> list[str]:
    if "pairs" not in tree:
        return (["data.dataset='p2dpo_pairs' trains on generated pairs: the config needs the pairs "
                 "section (configs/p2dpo.py)"] if tree["data"]["dataset"] == "p2dpo_pairs" else [])
    try:
        settings = PairSettings.from_config(tree["pairs"])
    except ValueError as error:
        return [f"pairs: {error}"]
    trained = tree["method"].get("combine_mode", settings.combine_mode)
    if trained != settings.combine_mode:  # the loss would read I_aug as the other mode's image
        return [f"method.combine_mode={trained!r} differs from pairs.combine_mode="
                f"{settings.combine_mode!r}, the mode the pairs' I_aug is generated in; set both "
                "to the same value"]
    return []


def _rollout_problems(tree: Mapping[str, Any]) -> list[str]:
    if not samples_rollouts(tree["method"]):
        return []
    if "rollout" not in tree:
        return [f"method {tree['method']['name']!r} samples rollouts: it needs the rollout "
                "section (configs/fisao.py)"]
    samples, batch = tree["rollout"]["num_samples"], tree["data"]["batch_size"]
    problems = []
    if samples < 2:
        problems.append(f"rollout.num_samples={samples}: the group baseline needs >= 2 samples "
                        "per prompt")
    if batch % max(samples, 1):
        problems.append(f"data.batch_size={batch} (samples per rollout step) must be a multiple "
                        f"of rollout.num_samples={samples}")
    return problems


def cache_problems(method: Mapping[str, Any]) -> list[str]:
    """Why ``reference.mode='cache'`` cannot serve a method (empty when it can).

    The cache holds per-token reference log-probs and token weights of each record's responses,
    computed once: it cannot hold the reference's whole next-token distribution (token KL),
    images redrawn every epoch (mDPO's crop, the noise image of ADAPT, TPO and P2-DPO's robustness
    pair), nor ADAPT's enhanced image built from the reference's attention.
    """
    plan = plan_scoring(method)
    problems = []
    if plan.token_kl:
        problems.append("reference.mode='cache' cannot serve the token_kl term: the KL needs the "
                        "reference's whole next-token distribution at every response position; "
                        "use reference.mode='copy' or 'lora_base', or method.terms.token_kl=0")
    if plan.per_epoch_images:
        problems.append(f"reference.mode='cache' cannot serve method {method['name']!r}: its "
                        f"reference scores responses on images redrawn every epoch "
                        f"{list(plan.per_epoch_images)}")
    if plan.needs_anchor:
        problems.append("reference.mode='cache' cannot serve ADAPT's VAG-DPO: the enhanced image "
                        "is built from the reference's attention every step")
    return problems


def _data_problems(tree: Mapping[str, Any], dataset_features: Collection[str]) -> list[str]:
    method, data = tree["method"], tree["data"]
    where = f"dataset {data['dataset']!r} split {data['split']!r}"
    if samples_rollouts(method):  # rollouts need prompts and their images only
        missing = [f for f in ("image", "prompt") if f not in set(dataset_features)]
        return [f"method {method['name']!r} samples rollouts from the images and prompts of "
                f"{where}, which lacks {missing}"] if missing else []
    missing = [f for f in plan_scoring(method).record_fields if f not in set(dataset_features)]
    return [f"method {method['name']!r} needs record fields {missing} that {where} lacks (it has "
            f"{sorted(dataset_features)})"] if missing else []
