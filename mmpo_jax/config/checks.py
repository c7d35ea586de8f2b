"""The checks a training config passes before anything compiles.

`validate(config, device_count=..., dataset_features=...)` raises one `ValueError` listing every
problem: unknown or missing fields and wrong types (against `config_loading.SCHEMA`), unknown
names, impossible meshes and batch splits, references a method cannot use, and record fields the
dataset lacks. `required_extras` / `required_record_fields` say what a method block needs from the
data pipeline and from the records of the training split.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

from mmpo_jax.data.builders import BUILDERS
from mmpo_jax.data.template import TEMPLATES
from mmpo_jax.models.lora import LLAMA_LINEAR_NAMES
from mmpo_jax.objectives import registry
from mmpo_jax.objectives.dpo import LOSS_TYPES
from mmpo_jax.objectives.logprobs import REDUCTIONS
from mmpo_jax.objectives.p2dpo import CALIB_REF_RESPONSES
from mmpo_jax.rewards.catpo import NORMALIZATIONS
from mmpo_jax.rewards.fisao import REWARD_GRANULARITIES
from mmpo_jax.config.loading import (
    METHOD_CORE,
    METHOD_OPTION_DEFAULTS,
    OPTIONAL_SECTIONS,
    SCHEMA,
    Required,
)
from mmpo_jax.engine.sharding import MESH_AXES

PRESETS = ("tiny", "llava_1_5_7b", "llava_1_5_13b")  # mmpo_jax.models.presets
INITS = ("sft_base", "random", "checkpoint")
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "constant", "linear")
REFERENCE_MODES = ("copy", "lora_base", "cache")
ROLLOUT_VOCABULARIES = ("shapes_world", "coco")

_CHOICES = {
    "model.preset": PRESETS, "model.init": INITS, "model.dtype": DTYPES,
    "model.param_dtype": DTYPES, "data.dataset": tuple(BUILDERS), "data.template": tuple(TEMPLATES),
    "optimizer.schedule": SCHEDULES, "reference.mode": REFERENCE_MODES,
    "method.loss_type": LOSS_TYPES, "method.reduction": REDUCTIONS,
    "method.nll_reduction": REDUCTIONS, "method.calib_ref_response": CALIB_REF_RESPONSES,
    "method.normalize": NORMALIZATIONS, "rollout.reward_granularity": REWARD_GRANULARITIES,
    "rollout.vocabulary": ROLLOUT_VOCABULARIES,
}
_POSITIVE = (
    "model.lora.rank", "data.batch_size", "optimizer.learning_rate", "optimizer.eps",
    "optimizer.grad_accum_steps", "train.num_steps", "train.log_every", "checkpoint.save_every",
    "checkpoint.keep", "eval.batch_size", "eval.max_new_tokens", "eval.control_learning_rate",
    "sft_base.num_steps", "sft_base.batch_size", "sft_base.learning_rate", "method.beta",
    "method.anchor_steps", "method.num_position_bins", "rollout.num_samples",
    "rollout.max_new_tokens", "rollout.ppo_epochs",
)
_RANGES = {  # inclusive bounds, None = open
    "model.lora.dropout": (0.0, 1.0), "data.max_length": (0, None), "data.num_epochs": (0, None),
    "optimizer.warmup_ratio": (0.0, 1.0), "optimizer.end_learning_rate_ratio": (0.0, 1.0),
    "optimizer.weight_decay": (0.0, None), "optimizer.b1": (0.0, 1.0), "optimizer.b2": (0.0, 1.0),
    "optimizer.grad_clip": (0.0, None), "eval.num_captions": (0, None),
    "eval.num_samples": (0, None), "method.alpha": (0.0, 1.0), "method.top_k_percent": (0.0, 100.0),
    "method.mask_threshold_percentile": (0.0, 1.0), "method.label_smoothing": (0.0, 0.5),
}

ROLLOUTS = "rollouts"
"""The extra of on-policy methods: samples of the policy, not records of a dataset."""

# Scored response -> (the record field holding its text, the pipeline extra its image needs).
_RESPONSES: dict[str, tuple[str | None, str | None]] = {
    "chosen": ("chosen", None), "rejected": ("rejected", None),
    "chosen_corrupt": ("chosen", "corrupt_pixel_values"),
    "chosen_ve": ("chosen", None),  # I_VE: made by the step from the reference's anchor mask
    "rejected_noise": ("rejected", "noise_pixel_values"),
    "focus_chosen": ("chosen", None), "focus_rejected": ("rejected", None),
    "robust_chosen": ("robust_chosen", "robust_pair"),
    "robust_rejected": ("robust_rejected", "robust_pair"),
    "calib_chosen_aug": ("chosen", "focus_images"), "calib_chosen_deg": ("chosen", "focus_images"),
    "calib_rejected_aug": ("rejected", "focus_images"),
    "calib_rejected_deg": ("rejected", "focus_images"),
    "sample": (None, ROLLOUTS),
}
_EXTRA_FIELDS = {"focus_images": ("focus_aug_image", "focus_deg_image"),
                 "ddw_clip": ("ddw_clip_crop", "ddw_clip_full")}


def required_extras(method_config: Mapping[str, Any]) -> tuple[str, ...]:
    """Pipeline extras (`data.pipeline.EXTRAS`, or `ROLLOUTS`) the method's scores need, sorted.

    Derived from `registry.required_scores(method_config)` (a method block: ``name``, ``terms``,
    ``token_weights``, options), e.g. mDPO -> ("corrupt_pixel_values",).
    """
    scores = registry.required_scores(method_config)
    extras = {_response(key)[1] for key in scores if key.count("/") == 2}
    if "p2dpo/focus_weights" in scores:
        extras.add("ddw_clip")
    if registry.token_weighting(method_config) == "tpo":  # Delta_t needs the noised image
        extras.add("noise_pixel_values")
    return tuple(sorted(extras - {None}))


def required_record_fields(method_config: Mapping[str, Any]) -> tuple[str, ...]:
    """Record fields of the training split the method reads (image, prompt, responses, extras).

    E.g. DPO -> ("chosen", "image", "prompt", "rejected"); P2-DPO adds ``robust_chosen``,
    ``robust_rejected``, ``focus_aug_image``, ``focus_deg_image`` (``ddw_clip_*`` with ddw).
    """
    scores = registry.required_scores(method_config)
    fields = {"image", "prompt"}
    fields.update(_response(key)[0] for key in scores if key.count("/") == 2)
    for extra in required_extras(method_config):
        fields.update(_EXTRA_FIELDS.get(extra, ()))
    return tuple(sorted(fields - {None}))


def _response(score_key: str) -> tuple[str | None, str | None]:
    response = score_key.split("/")[1]
    if response not in _RESPONSES:
        raise ValueError(f"scored response {response!r} (from {score_key!r}) has no known record "
                         f"field or extra; known: {sorted(_RESPONSES)}")
    return _RESPONSES[response]


def validate(config: Any, *, device_count: int | None = None,
             dataset_features: Collection[str] | None = None) -> None:
    """Checks a full config (ConfigDict or nested dicts); raises one error listing every problem.

    Args:
      config: the experiment config (`SCHEMA`).
      device_count: devices the mesh spans; None skips the checks that need it.
      dataset_features: record fields of the training split; None skips the data check.

    Raises:
      ValueError: the problems, one per line.
    """
    tree = _plain(config)
    problems = _structure_problems(tree)
    if not problems:
        method_problems = _method_problems(tree["method"])
        problems = [*_value_problems(tree), *method_problems,
                    *_mesh_and_batch_problems(tree, device_count)]
        if not method_problems:
            problems += _reference_problems(tree)
            if dataset_features is not None:
                problems += _data_problems(tree, dataset_features)
    if problems:
        raise ValueError(f"config {tree.get('name')!r} is invalid:\n  - " + "\n  - ".join(problems))


def _plain(value: Any) -> Any:
    value = value.to_dict() if hasattr(value, "to_dict") else value
    return {k: _plain(v) for k, v in value.items()} if isinstance(value, Mapping) else value


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


def _structure_problems(tree: Mapping[str, Any]) -> list[str]:
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
    known = {**METHOD_CORE, **METHOD_OPTION_DEFAULTS}
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
    buckets, max_length = tuple(tree["data"]["buckets"]), tree["data"]["max_length"]
    if not buckets or any(b <= 0 for b in buckets) or list(buckets) != sorted(set(buckets)):
        problems.append(f"data.buckets={buckets} must be positive and strictly increasing")
    elif max_length > buckets[-1]:
        problems.append(f"data.max_length={max_length} exceeds the largest bucket {buckets[-1]}")
    band = _get(tree, "method.layer_band")
    if band is not None and not (len(band) == 2 and 0.0 <= band[0] <= band[1] <= 1.0):
        problems.append(f"method.layer_band={tuple(band)} must be (low, high) with "
                        "0 <= low <= high <= 1")
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
                 f"(mesh {sizes}, batch axes {axes})"
                 for what, size in batches.items() if size % parallel]
    return problems


def _reference_problems(tree: Mapping[str, Any]) -> list[str]:
    mode, method = tree["reference"]["mode"], tree["method"]
    if mode == "lora_base" and not tree["model"]["lora"]["enabled"]:
        return ["reference.mode='lora_base' (the policy with its adapters off) needs "
                "model.lora.enabled=True; use reference.mode='copy' for full fine-tuning"]
    if mode != "cache":
        return []
    return cache_problems(method)


def cache_problems(method: Mapping[str, Any]) -> list[str]:
    """Why ``reference.mode='cache'`` cannot serve a method (empty when it can).

    The cache holds per-token reference log-probs and token weights of each record's responses,
    computed once: it cannot hold the reference's whole next-token distribution (token KL),
    images redrawn every epoch (mDPO's crop, the noise image of ADAPT, TPO and P2-DPO's robustness
    pair), nor ADAPT's enhanced image built from the reference's attention.
    """
    from mmpo_jax.training.loop import RANDOMISED_IMAGES
    from mmpo_jax.engine.scoring import plan_scoring

    try:
        plan = plan_scoring(method)
    except NotImplementedError as error:
        return [f"reference.mode='cache': {error}"]
    problems = []
    if plan.token_kl:
        problems.append("reference.mode='cache' cannot serve the token_kl term: the KL needs the "
                        "reference's whole next-token distribution at every response position; "
                        "use reference.mode='copy' or 'lora_base', or method.terms.token_kl=0")
    randomised = sorted(set(plan.images) & set(RANDOMISED_IMAGES))
    if randomised:
        problems.append(f"reference.mode='cache' cannot serve method {method['name']!r}: its "
                        f"reference scores responses on images redrawn every epoch {randomised}")
    if plan.needs_anchor:
        problems.append("reference.mode='cache' cannot serve ADAPT's VAG-DPO: the enhanced image "
                        "is built from the reference's attention every step")
    return problems


def _data_problems(tree: Mapping[str, Any], dataset_features: Collection[str]) -> list[str]:
    method, data = tree["method"], tree["data"]
    where = f"dataset {data['dataset']!r} split {data['split']!r}"
    if ROLLOUTS in required_extras(method):  # rollouts need prompts and their images only
        missing = [f for f in ("image", "prompt") if f not in set(dataset_features)]
        return [f"method {method['name']!r} samples rollouts from the images and prompts of "
                f"{where}, which lacks {missing}"] if missing else []
    missing = [f for f in required_record_fields(method) if f not in set(dataset_features)]
    return [f"method {method['name']!r} needs record fields {missing} that {where} lacks (it has "
            f"{sorted(dataset_features)})"] if missing else []
