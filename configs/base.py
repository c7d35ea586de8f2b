"""Section helpers of the training configs: one per section, each a ``ConfigDict`` of the schema.

Every helper starts from the schema's defaults (``mmpo_jax.config.schema.SCHEMA``, the
contract the trainer reads) and takes keyword overrides; an unknown keyword raises. ``experiment``
assembles the sections into one locked config. Config files load this file by path::

    base = config_module(pathlib.Path(__file__).with_name("base.py"))
    def get_config(arg=None):
        return base.experiment("dpo", base.method("dpo"), optimizer=dict(learning_rate=1e-5))

A section override is a mapping of field overrides (a nested mapping for ``model.lora``); a
free-form mapping (``data.builder``, ``method.terms``, ``reference_settings``) is replaced whole.
"""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

from mmpo_jax.config.loading import config_module
from mmpo_jax.config.schema import OPEN_MAPPINGS, OPTIONAL_SECTIONS, SCHEMA, Required, method_defaults
from mmpo_jax.objectives import registry

SECTIONS = ("model", "data", "optimizer", "train", "mesh", "reference", "checkpoint", "eval",
            "sft_base", "distributed", "rollout", "pairs", "benchmarks")


def _config_dict(spec: Any) -> Any:
    """Schema defaults -> ConfigDict values (a `Required` field becomes a typed placeholder)."""
    if isinstance(spec, Required):
        return config_dict.placeholder(spec.type)
    if isinstance(spec, dict):
        return ml_collections.ConfigDict({key: _config_dict(value) for key, value in spec.items()})
    return copy.deepcopy(spec)


def _apply(section: ml_collections.ConfigDict, overrides: Mapping[str, Any], path: str) -> None:
    """Sets ``overrides`` on ``section`` with ConfigDict's type checks; unknown keys raise."""
    for key, value in overrides.items():
        where = f"{path}.{key}" if path else key
        if key not in section:
            raise ValueError(f"{path or 'the config'} has no field {key!r}; valid fields: "
                             f"{sorted(section.keys())}")
        if where in OPEN_MAPPINGS:  # free-form: replaced whole
            section[key] = ml_collections.ConfigDict(dict(value))
        elif isinstance(section[key], ml_collections.ConfigDict):
            _apply(section[key], value, where)
        else:
            section[key] = tuple(value) if isinstance(value, list) else value


def section(name: str, **overrides: Any) -> ml_collections.ConfigDict:
    """The schema section ``name`` (also ``rollout``) with ``overrides`` applied."""
    schema = {**SCHEMA, **OPTIONAL_SECTIONS}
    if name not in SECTIONS:
        raise ValueError(f"unknown section {name!r}; valid: {SECTIONS}")
    config = _config_dict(schema[name])
    _apply(config, overrides, name)
    return config


def model(**overrides: Any) -> ml_collections.ConfigDict:
    """``model``: preset, initialisation, dtypes, remat, freezing, ``lora`` (nested overrides)."""
    return section("model", **overrides)


def data(**overrides: Any) -> ml_collections.ConfigDict:
    """``data``: dataset, split, directories, tokenizer, template, global batch, buckets, epochs,
    over-long responses (``too_long``), the last partial batch (``drop_remainder``), image size."""
    return section("data", **overrides)


def optimizer(**overrides: Any) -> ml_collections.ConfigDict:
    """``optimizer``: AdamW, schedule, clipping, gradient accumulation (learning_rate required)."""
    return section("optimizer", **overrides)


def train(**overrides: Any) -> ml_collections.ConfigDict:
    """``train``: optimizer steps (required; 0 = ``data.num_epochs`` over the split), logging."""
    return section("train", **overrides)


def mesh(**overrides: Any) -> ml_collections.ConfigDict:
    """``mesh``: ``data`` / ``fsdp`` / ``tensor`` sizes, one of them may be -1."""
    return section("mesh", **overrides)


def reference(**overrides: Any) -> ml_collections.ConfigDict:
    """``reference``: "copy" | "lora_base" | "cache", and the cache directory."""
    return section("reference", **overrides)


def checkpoint(**overrides: Any) -> ml_collections.ConfigDict:
    """``checkpoint``: save cadence, retention, async save, resume, transformers export."""
    return section("checkpoint", **overrides)


def evaluation(**overrides: Any) -> ml_collections.ConfigDict:
    """The ``eval`` section: splits, sampling, and the chosen-only control row."""
    return section("eval", **overrides)


def sft_base(**overrides: Any) -> ml_collections.ConfigDict:
    """``sft_base``: how the cached shapes-world SFT base is trained."""
    return section("sft_base", **overrides)


def distributed(**overrides: Any) -> ml_collections.ConfigDict:
    """``distributed``: how the processes of a multi-host job find each other, and timeouts
    (``mmpo_jax.engine.distributed.Settings``)."""
    return section("distributed", **overrides)


def rollout(**overrides: Any) -> ml_collections.ConfigDict:
    """``rollout`` (on-policy methods): samples per prompt, temperature, PPO epochs, vocabulary."""
    return section("rollout", **overrides)


def pairs(**overrides: Any) -> ml_collections.ConfigDict:
    """``pairs`` (P2-DPO): how its focus and robustness pairs are generated from the initial model
    (``mmpo_jax.pipelines.p2dpo.PairSettings``)."""
    return section("pairs", **overrides)


def benchmarks(**overrides: Any) -> ml_collections.ConfigDict:
    """``benchmarks``: real-data CHAIR (COCO), POPE and AMBER evaluated at the end of training
    (and every ``every`` steps), from the benchmarks' published files (``training.benchmarks``)."""
    return section("benchmarks", **overrides)


def method(name: str, **options: Any) -> ml_collections.ConfigDict:
    """The ``method`` block: ``name``, ``beta``, ``terms`` ({term: float}), ``token_weights``
    ("catpo" | "tpo" | "none") and the options its terms read, at their METHODS.md defaults.

    ``terms`` / ``token_weights`` (None -> the method's) and any option may be overridden.
    """
    block = method_defaults(name, **options)
    block["terms"] = ml_collections.ConfigDict(block["terms"])
    return ml_collections.ConfigDict(block)


def experiment(name: str, method: ml_collections.ConfigDict, **sections: Any
               ) -> ml_collections.ConfigDict:
    """A full, locked config: the schema's defaults with ``sections`` overridden.

    Args:
      name: the run name (``workdir`` defaults to ``runs/<name>``).
      method: the ``method`` block (`method`).
      **sections: ``seed`` / ``workdir`` / ``mesh_rules`` values, section overrides (mappings,
        e.g. ``optimizer=dict(learning_rate=1e-5)``), ``rollout``, ``pairs`` and ``benchmarks``
        (the optional section is added) and ``reference_settings`` (a free-form mapping, documentation).
    """
    config = _config_dict(SCHEMA)
    config.name = name
    config.method = method
    for optional in ("rollout", "pairs", "benchmarks"):
        if optional in sections:
            config[optional] = section(optional)
    if "reference_settings" in sections:
        config.reference_settings = ml_collections.ConfigDict()
    override(config, sections)
    config.lock()
    return config


def override(config: ml_collections.ConfigDict, sections: Mapping[str, Any]) -> None:
    """Applies ``{section: {field: value}}`` (or ``{field: value}`` at the top) to ``config``."""
    _apply(config, sections, "")


# --- LLaVA-1.5 presets -----------------------------------------------------------------------

# reference_settings key -> (section, field): what a paper's settings set on a LLaVA run.
_SETTING_FIELDS = {
    "learning_rate": ("optimizer", "learning_rate"), "schedule": ("optimizer", "schedule"),
    "warmup_ratio": ("optimizer", "warmup_ratio"), "weight_decay": ("optimizer", "weight_decay"),
    "b2": ("optimizer", "b2"), "grad_clip": ("optimizer", "grad_clip"),
    "batch_size": ("data", "batch_size"), "lora_rank": ("model", "lora", "rank"),
    "lora_alpha": ("model", "lora", "alpha"), "lora_dropout": ("model", "lora", "dropout"),
    "freeze_vision": ("model", "freeze_vision"), "reference_mode": ("reference", "mode"),
}


def method_file_config(method_name: str) -> ml_collections.ConfigDict:
    """``configs/<method_name>.py``'s ``get_config()`` (the tiny shapes-world run)."""
    if method_name not in registry.methods():
        raise ValueError(f"unknown method {method_name!r}; valid: {sorted(registry.methods())}")
    return config_module(pathlib.Path(__file__).with_name(f"{method_name}.py")).get_config()


def method_and_devices(arg: str | None, *, default_devices: int) -> tuple[str, int]:
    """A platform preset's argument ``"<method>"`` or ``"<method>,<devices>"`` -> (method, devices);
    the method defaults to "catpo". The device count is part of the argument because a config is
    read before the job's devices are known (a multi-host job starts ``jax.distributed`` after)."""
    method, _, devices = (arg or "catpo").partition(",")
    if devices and not devices.strip().isdigit():
        raise ValueError(f"{arg!r}: expected '<method>,<devices>' with an integer device count, "
                         "e.g. 'catpo,16'")
    return method.strip() or "catpo", int(devices) if devices else default_devices


def accumulation_steps(devices: int, *, batch_size: int, rows_per_device: int, min_rows: int) -> int:
    """``optimizer.grad_accum_steps`` that split ``batch_size`` into micro-batches of
    ``max(min_rows, rows_per_device * devices)`` rows spread evenly over ``devices``; a one-line
    ``ValueError`` naming the valid counts for one the batch cannot spread over."""
    def micro(count: int) -> int:
        return max(min_rows, rows_per_device * count)

    valid = [c for c in range(1, batch_size + 1) if batch_size % micro(c) == 0 and micro(c) % c == 0]
    if devices not in valid:
        raise ValueError(f"{devices} devices: the batch of {batch_size} spreads evenly over {valid} "
                         "devices only (or set --config.data.batch_size and "
                         "--config.optimizer.grad_accum_steps yourself)")
    return batch_size // micro(devices)


def llava_1_5_7b(method_config: ml_collections.ConfigDict, **sections: Any
                 ) -> ml_collections.ConfigDict:
    """LLaVA-1.5-7B on RLHF-V with the method block and reference settings of ``method_config``.

    bf16 compute over f32 parameters, remat, LoRA on every decoder linear layer (rank/alpha from
    the paper's settings, else the schema's) with the projector and vision tower frozen,
    ``reference.mode="lora_base"`` (the policy with its adapters off: the initial policy, without
    a second 7B copy). Length: the paper's epochs (``data.num_epochs``; 1 where none is
    recorded) over the prepared training split, whatever its size (``train.num_steps=0``: the
    steps are resolved when the run starts and logged); each epoch's last partial batch is padded
    (``data.drop_remainder=False``). ``sections`` (platform: mesh, accumulation) override last.

    Images: LLaVA-1.5's pad-to-square (``data.image_aspect_ratio="pad"``) over the model's own
    processor files; the tokenizer and processor are read from the imported checkpoint folder
    (``config.model_files``), so training, pair generation, evaluation and the export preprocess
    alike.

    Set before running (placeholders, all checked before anything is loaded):
    ``--config.model.checkpoint`` (``python -m mmpo_jax.convert import <hf_dir> <orbax_dir>
    --image_aspect_ratio pad``, which saves the tokenizer and processor there too),
    ``--config.data.manual_dir`` (the RLHF-V parquet folder, needed until the dataset is
    prepared; for P2-DPO the folder its pairs are generated into) and, for P2-DPO,
    ``--config.pairs.source_manual_dir`` (the RLHF-V parquet folder its prompts come from).
    Optional: ``--config.data.tokenizer`` (a tokenizer/processor folder other than the
    checkpoint's) and the ``benchmarks`` section (``--config.benchmarks.pope_questions=...``:
    CHAIR / POPE / AMBER at the end of training, or every ``--config.benchmarks.every`` steps).
    """
    settings = method_config.get("reference_settings", ml_collections.ConfigDict())
    config = experiment(
        f"llava_1_5_7b_{method_config.name}",
        copy.deepcopy(method_config.method),
        # LoRA on the decoder only, projector frozen: the reference is the same model with its
        # adapters off (lora_base), which a trained projector would move.
        model=dict(preset="llava_1_5_7b", init="checkpoint",
                   checkpoint="~/models/llava-1.5-7b-orbax", dtype="bfloat16",
                   param_dtype="float32", remat=True, train_projector=False,
                   lora=dict(enabled=True)),
        # P2-DPO trains on its generated pairs (p2dpo_pairs); the others on RLHF-V.
        data=dict(dataset="p2dpo_pairs" if method_config.data.dataset == "p2dpo_pairs"
                  else "rlhf_v", split="train",
                  manual_dir="", tokenizer="", image_aspect_ratio="pad",
                  buckets=(1024, 2048)),
        optimizer=dict(learning_rate=method_config.optimizer.learning_rate),
        train=dict(num_steps=0, log_every=1),  # 0: data.num_epochs over the split
        reference=dict(mode="lora_base"),
        checkpoint=dict(save_every=200, keep=2),
        # The shapes-world evaluation has no RLHF-V counterpart; real benchmarks: `benchmarks`.
        eval=dict(enabled=False, control=False),
        benchmarks=dict(batch_size=8),  # no benchmark files set: none evaluated
        reference_settings=settings,
        **({"rollout": dict(vocabulary="coco", max_new_tokens=128)}
           if "rollout" in method_config else {}),
        # P2-DPO generates its pairs from the LLaVA base on RLHF-V's prompts, at the paper's
        # settings (PairSettings' defaults).
        **({"pairs": dict(source_dataset="rlhf_v", source_split="train", question_fraction=0.0)}
           if "pairs" in method_config else {}),
    )
    for key, value in settings.items():
        if key in _SETTING_FIELDS:
            *parents, field = _SETTING_FIELDS[key]
            node = config
            for parent in parents:
                node = node[parent]
            node[field] = value
    config.data.num_epochs = int(settings.get("num_epochs", 1))
    override(config, sections)
    return config
