"""What a training config is: every section and field the trainer reads, and the method block.

`SCHEMA` states every section and field, with its default (hence its type): `configs/base.py`
builds its sections from it, `config.checks.validate` checks configs against it. A `Required`
entry has no default; an empty dict is a free-form mapping (builder options). The method block is
open-ended: `METHOD_CORE` (``name``, ``terms``, ``token_weights``) plus the options that its
terms and token weighting declare (`objectives.registry`), filled in by `method_defaults`.
Optional sections: ``reference_settings`` (free-form: a paper's hyper-parameters, documentation),
``rollout`` (on-policy sampling, read by the FiSAO loop) and ``pairs`` (P2-DPO's pair generation,
``pipelines.p2dpo.PairSettings``; a config training on ``p2dpo_pairs`` has it) and
``benchmarks`` (real-data evaluation during and after training, `BENCHMARKS`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mmpo_jax.engine import distributed
from mmpo_jax.engine.sharding import DEFAULT_RULES
from mmpo_jax.evaluation.suite import EvaluationSpec
from mmpo_jax.models.lora import LLAMA_LINEAR_NAMES
from mmpo_jax.objectives import registry
from mmpo_jax.pipelines.p2dpo import PairSettings


def _section_default(field: dataclasses.Field) -> Any:
    """A dataclass field's default as a config value: None -> "" (a path) or 0 (a count)."""
    if field.default is not None:
        return field.default
    return 0 if field.type in ("int | None", int) else ""


@dataclasses.dataclass(frozen=True)
class Required:
    """A schema field without a default: every config must set it (to a ``type``)."""

    type: type


SCHEMA: dict[str, Any] = {
    "seed": 0,
    "workdir": "",  # "" -> runs/<name>
    "name": Required(str),
    "model": {
        "preset": "tiny", "init": "sft_base", "checkpoint": "", "dtype": "float32",
        "param_dtype": "float32", "remat": False, "freeze_vision": True, "train_projector": True,
        "lora": {"enabled": False, "rank": 64, "alpha": 128.0, "dropout": 0.05,
                 "targets": LLAMA_LINEAR_NAMES},
    },
    "data": {
        "dataset": "shapes_world", "split": "preference", "data_dir": "~/mmpo_data",
        "manual_dir": "", "builder": {}, "tokenizer": "", "template": "llava_1_5",
        "batch_size": 32, "buckets": (64, 96), "max_length": 0, "num_epochs": 0, "shuffle": True,
        # a response longer than max_length: "truncate" (kept, cut) | "skip"; both counted
        "too_long": "truncate",
        # each epoch's last partial batch: padded (False; every record every epoch) or dropped
        "drop_remainder": False,
        "image_size": 0,  # 0: the dataset's preprocessing size; N: images resized to N px
        # "pad" (LLaVA-1.5's pad-to-square) | "square" (resize + centre crop) | "": as the
        # model's processor file says (config.model_files)
        "image_aspect_ratio": "",
    },
    "optimizer": {
        "learning_rate": Required(float), "schedule": "cosine", "warmup_ratio": 0.1,
        "end_learning_rate_ratio": 0.0, "weight_decay": 0.05, "b1": 0.9, "b2": 0.999,
        "eps": 1e-8, "grad_clip": 1.0, "grad_accum_steps": 1,
    },
    # max_bad_steps: stop after this many consecutive steps with a NaN/inf loss or gradient norm
    # (each one's update is skipped; training.divergence)
    "train": {"num_steps": Required(int), "log_every": 10, "progress_bar": True,
              "max_bad_steps": 5},
    "mesh": {"data": -1, "fsdp": 1, "tensor": 1},
    "mesh_rules": DEFAULT_RULES,
    "reference": {"mode": "copy", "cache_dir": ""},
    "checkpoint": {"save_every": 100, "keep": 2, "async_save": True, "resume": True,
                   "export_hf": False},
    "eval": {
        "enabled": True, "caption_split": "test_caption", "pope_split": "test_pope",
        "num_captions": 0, "num_samples": 3, "temperature": 1.0, "max_new_tokens": 24,
        "batch_size": 64, "control": True,
        "control_learning_rate": 5e-5,  # the control run's (configs/sft.py's) learning rate
    },
    "sft_base": {"split": "sft", "num_steps": 1300, "batch_size": 32, "learning_rate": 1e-3,
                 "cache_dir": "",
                 # two-image prompts mixed into the SFT (the v2 world's "sft_focus"; "": none)
                 "focus_split": "",
                 # training.vision_pretrain: the tower alone first (v2 only), then frozen or not
                 "vision_steps": 0, "freeze_vision": False,
                 "vision_batch_size": 0,  # the tower's batches (0: sft_base.batch_size)
                 "buckets": ()},  # the SFT's padded lengths (empty: data.buckets)
    # several processes (hosts of a pod): engine.distributed.Settings
    "distributed": dataclasses.asdict(distributed.Settings()),
}
"""Section -> field -> default (the method block is `method_defaults`')."""

BENCHMARKS: dict[str, Any] = {
    # evaluate every N optimizer steps (0: at the end of training only)
    "every": 0,
    **{field.name: _section_default(field) for field in dataclasses.fields(EvaluationSpec)
       if field.name not in ("decoding", "num_samples", "temperature", "seed")},
}
"""The ``benchmarks`` section: `evaluation.suite.EvaluationSpec`'s fields (greedy decoding; an
unset path is "", an unset count 0) and ``every``. No benchmark path set: nothing is evaluated."""

OPTIONAL_SECTIONS: dict[str, Any] = {
    "reference_settings": {},
    "rollout": {"num_samples": 4, "temperature": 1.0, "max_new_tokens": 24, "ppo_epochs": 2,
                "reward_granularity": "token", "vocabulary": "shapes_world"},
    # P2-DPO's pair generation (pipelines.p2dpo.PairSettings, METHODS.md §5 defaults)
    "pairs": dataclasses.asdict(PairSettings()),
    # real-data benchmarks evaluated during and after training (training.benchmarks)
    "benchmarks": BENCHMARKS,
}

METHOD_CORE = {"name": Required(str), "terms": {}, "token_weights": registry.NO_WEIGHTING}
OPEN_MAPPINGS = ("data.builder", "method.terms", "reference_settings", "pairs.source_builder")


def method_option_defaults() -> dict[str, Any]:
    """Every method option any registered term or weighting declares, with its default."""
    return {name: option.default for name, option in registry.option_declarations().items()}


def method_defaults(name: str, *, terms: Mapping[str, float] | None = None,
                    token_weights: str | None = None, **options: Any) -> dict[str, Any]:
    """The method block of ``name``: its terms, weighting and the options they read.

    Args:
      name: a registered method (`objectives.registry.methods`).
      terms: ``{term: weight}``; None -> the method's default terms.
      token_weights: a registered weighting or "none"; None -> the method's default.
      **options: values for declared options (`method_option_defaults`); any declared option may
        be given, also one the method's terms do not read.

    Raises:
      ValueError: unknown method, term, weighting or option.
    """
    default = registry.method({"name": name})
    terms = {term: float(weight) for term, weight in (terms or default.terms).items()}
    weighting = default.token_weights if token_weights is None else token_weights
    weighting = registry.NO_WEIGHTING if weighting is None else weighting
    core = {"name": name, "terms": terms, "token_weights": weighting}
    declared = method_option_defaults()
    unknown = sorted(set(options) - set(declared))
    if unknown:
        raise ValueError(f"unknown method options {unknown}; valid: {sorted(declared)}")
    block = dict(core)
    block.update((key, option.default) for key, option in registry.options_read(core).items())
    block.update(options)
    return block
