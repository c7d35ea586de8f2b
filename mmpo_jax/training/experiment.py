"""The main job: data, initial model, method run, chosen-only control, before/after table.

``run_experiment(config)`` is what ``python -m mmpo_jax.train --config=configs/<method>.py`` does:

1. prepare the training split (the shapes world is generated under ``data.data_dir`` if absent)
   and its tokenizer;
2. the initial policy: ``model.init="sft_base"`` trains the tiny model by SFT on the shapes
   world's ``sft`` split once and caches it under ``<data_dir>/sft_base/<key>`` (the key hashes
   the world, the model preset, the SFT settings and the tokenizer); ``"checkpoint"`` loads an
   orbax checkpoint written by ``python -m mmpo_jax.convert import``; ``"random"`` initialises;
3. evaluate the initial policy, train the method (``training.loop.train``), evaluate it: on the
   shapes world (``eval``) and/or on real-data benchmarks (the ``benchmarks`` section:
   CHAIR / POPE / AMBER, also every ``benchmarks.every`` steps, ``training.benchmarks``);
4. the **control**: the same initial policy fine-tuned with plain SFT on the chosen responses of
   the same split, for the same number of steps and batch size, at ``eval.control_learning_rate``
   (chosen captions are clean data, so this alone lowers hallucination; a method shows its worth
   only by beating it);
5. print and save (``<workdir>/results.json``, ``results.txt``) the table of CHAIR / POPE rows.

The tokenizer and image preprocessing are the model's (``config.model_files``): for an imported
checkpoint, the files ``convert import`` saved beside it, the same that pair generation,
evaluation and the export use.

Several processes (``engine.distributed``): process 0 prepares a dataset first and the others
then find it (shared disk) or prepare their own copy; the SFT base trains once, over all of them
(one SPMD run), and is cached by process 0's decision; every process evaluates its own whole copy
of a model (the same numbers), and process 0 alone prints and writes the table.

Before any data or model is loaded, every directory the job will write is probed
(``engine.disk.require_writable``): the workdir and each variant's, ``data.data_dir`` for the
shapes world (generated there), the SFT-base cache (``<data.data_dir>/sft_base`` unless
``sft_base.cache_dir`` moves it), ``reference.cache_dir`` and, for P2-DPO, the pairs'
``data.manual_dir``. [our choice] A real dataset's ``data.data_dir`` is not probed: a
prepared copy may sit on a read-only mount.

The SFT-base cache entry ``<key>/model/`` is written under a temporary name and renamed into
place last (``commit_model``), so a run killed at any moment leaves no model or a complete one;
the next run rebuilds a missing or incomplete one (its training resumes from ``<key>/run/``'s
checkpoints).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pathlib
import shutil
from typing import Any, Mapping, Sequence

import jax
import ml_collections
from flax import nnx

from mmpo_jax.data import image_processing, shapes_world_v2
from mmpo_jax.data.sources import load_split
from mmpo_jax.data.tokenizer import load_tokenizer
from mmpo_jax.evaluation.runner import evaluate_model
from mmpo_jax.evaluation.table import DEFAULT_COLUMNS, format_table
from mmpo_jax.models import presets
from mmpo_jax.models.llava import Llava, LlavaConfig
from mmpo_jax.pipelines.p2dpo import PairSettings, TrainingLayout, generate_pairs
from mmpo_jax.data.builders.p2dpo_pairs import summarize
from mmpo_jax.engine import distributed, model_io, reference_cache, sharding
from mmpo_jax.engine.disk import require_writable
from mmpo_jax.config import checks as config_checks
from mmpo_jax.config import model_files
from mmpo_jax.config.schema import method_defaults
from mmpo_jax.training import benchmarks
from mmpo_jax.training.loop import train
from mmpo_jax.training.vision_pretrain import pretrain_vision

logger = logging.getLogger(__name__)

SHAPES_WORLD = "shapes_world"


def _expand(path: str) -> pathlib.Path:
    return pathlib.Path(os.path.expanduser(path))


def load_data(config: Any) -> tuple[Any, Any, image_processing.ImageProcessorConfig]:
    """``(training split, tokenizer, image preprocessing)`` of ``config.data``; the tokenizer and
    preprocessing are the model's (`config.model_files`): those of its checkpoint folder (saved
    there by ``convert import``) when it has them."""
    data = config.data
    source = _split(data, data.split)
    tree = config_checks.plain(config)
    tokenizer_path = model_files.tokenizer_dir(tree, source.tokenizer_path)
    if tokenizer_path is None:
        raise ValueError(f"{data.dataset} ships no tokenizer; set data.tokenizer to a tokenizer "
                         "directory")
    tokenizer = load_tokenizer(tokenizer_path)
    world = getattr(source, "metadata", {}).get("world")
    image_config = model_files.image_config(tree, world)
    if model_files.reads_processor_files(tree, world):
        logger.info("%s: image preprocessing from %s: %s", config.name,
                    model_files.processor_dir(tree), image_config)
    return source, tokenizer, image_config


def _split(data: Any, split: str) -> Any:
    """One split of ``config.data``'s dataset, prepared by the primary process first."""
    return distributed.primary_first(f"prepare {data.dataset}", lambda: load_split(
        data.dataset, split, data_dir=_expand(data.data_dir),
        manual_dir=_expand(data.manual_dir) if data.manual_dir else None,
        **data.builder.to_dict()))


def model_config(config: Any, tokenizer: Any) -> LlavaConfig:
    """The ``LlavaConfig`` of ``config.model.preset`` with the tokenizer's special ids."""
    model = config.model
    if model.preset in presets.TINY_PRESETS:  # sized by the data's tokenizer
        return getattr(presets, model.preset)(vocab_size=len(tokenizer),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            dtype=model.dtype, param_dtype=model.param_dtype)
    factory = getattr(presets, model.preset, None)
    if factory is None:
        raise ValueError(f"unknown model preset {model.preset!r}")
    return factory(dtype=model.dtype, param_dtype=model.param_dtype)


def check_image_size(config: Any, tokenizer: Any,
                     image_config: image_processing.ImageProcessorConfig) -> None:
    """Raises `config.checks.ConfigError` when ``image_config`` makes images of another size than
    the initial model's vision tower takes; read without loading or compiling the model (the
    checkpoint's ``config.json`` for ``model.init="checkpoint"``, else the preset's)."""
    if config.model.init == "checkpoint":
        stored = _expand(config.model.checkpoint) / model_io.CONFIG_FILE
        llava_config = LlavaConfig.from_dict(json.loads(stored.read_text()))
    else:
        llava_config = model_config(config, tokenizer)
    problems = config_checks.image_size_problems(config, image_config.crop_size,
                                                 llava_config.vision_config.image_size)
    if problems:
        raise config_checks.ConfigError(config_checks.format_problems(config, problems))


def with_epoch_steps(config: Any, num_records: int) -> Any:
    """``config`` itself, or with ``train.num_steps=0`` a copy with the steps of
    ``data.num_epochs`` passes over ``num_records`` (`config.checks.epoch_steps`), logged."""
    if int(config.train.num_steps):
        return config
    steps = config_checks.epoch_steps(config, num_records, process_count=jax.process_count())
    logger.info("%s: train.num_steps=0 -> %d steps: data.num_epochs=%d over %d records, batches "
                "of %d (data.drop_remainder=%s)", config.name, steps, config.data.num_epochs,
                num_records, config.data.batch_size, config.data.drop_remainder)
    resolved = ml_collections.ConfigDict(config.to_dict())
    resolved.train.num_steps = steps
    return resolved


def with_runtime(llava_config: LlavaConfig, model: Any) -> LlavaConfig:
    """``llava_config`` with the run's ``model.dtype`` / ``param_dtype`` (both towers, projector)
    and ``model.remat`` (the decoder's layers): how to compute, never what is computed."""
    fields = llava_config.to_dict()
    for tower in ("text_config", "vision_config"):
        fields[tower].update(dtype=str(model.dtype), param_dtype=str(model.param_dtype))
    fields["text_config"]["remat"] = bool(model.remat)
    return LlavaConfig.from_dict(fields)


def _digest(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def sft_base_config(config: Any) -> ml_collections.ConfigDict:
    """The training config of the cached SFT base, derived from ``config``'s sections."""
    base = ml_collections.ConfigDict(config.to_dict())
    section = config.sft_base
    base.name = "sft_base"
    base.data.split = section.split
    base.data.batch_size = int(section.batch_size)
    base.data.num_epochs = 0
    base.data.too_long, base.data.drop_remainder = "truncate", False  # not in the cache key
    if section.buckets:  # the SFT's own, so that a method's larger buckets keep the base's key
        base.data.buckets = tuple(int(b) for b in section.buckets)
    base.train.num_steps = int(section.num_steps)
    base.optimizer.learning_rate = float(section.learning_rate)
    base.optimizer.warmup_ratio = 0.05
    base.optimizer.weight_decay = 0.0
    base.method = ml_collections.ConfigDict(method_defaults("sft"))
    base.model.lora.enabled = False
    # the tiny model learns to see from scratch (in the SFT, or first alone: vision_pretrain)
    base.model.freeze_vision = bool(section.freeze_vision)
    base.model.train_projector = True
    base.reference.mode = "copy"
    return base


def train_sft_base(base_config: Any, model: Llava, tokenizer: Any, source: Any,
                   image_config: ImageProcessorConfig, workdir: pathlib.Path,
                   held_out: Sequence[Mapping[str, Any]] = ()) -> Llava:
    """The SFT base trained from ``model`` by ``sft_base_config``'s ``base_config``: the vision
    tower alone first when ``sft_base.vision_steps`` > 0 (`vision_pretrain`; its per-cell
    accuracy on ``held_out`` records is logged), then the SFT (with ``sft_base.focus_split``'s
    two-image prompts interleaved)."""
    section = base_config.sft_base
    if int(section.vision_steps):
        logger.info("SFT base: %d steps of the vision tower alone first", int(section.vision_steps))
        tower = pretrain_vision(model, source, image_config, source.metadata["world"],
                                steps=int(section.vision_steps),
                                batch_size=int(section.vision_batch_size or section.batch_size),
                                learning_rate=float(section.learning_rate), seed=int(base_config.seed),
                                held_out=held_out)
        logger.info("SFT base: vision tower %s", json.dumps(tower, sort_keys=True))
    return train(base_config, model=model, tokenizer=tokenizer, source=source,
                 image_config=image_config, workdir=workdir,
                 focus_source=focus_source(base_config)).model


def focus_source(base_config: Any) -> Any:
    """The two-image records mixed into the SFT base (``sft_base.focus_split``), or None."""
    split = base_config.sft_base.focus_split
    return _split(base_config.data, split) if split else None


def sft_base_identity(config: Any) -> dict[str, Any]:
    """What keys the cached SFT base besides the model config and the tokenizer: the world, the
    ``sft_base`` section, the seed, the trained model section and the SFT's data layout."""
    base_config = sft_base_config(config)
    return {"world": config.data.builder.to_dict(), "sft": base_config.sft_base.to_dict(),
            "seed": int(config.seed), "trained": base_config.model.to_dict(),
            "data": {k: base_config.data[k] for k in ("buckets", "template", "max_length")}}


def initial_model(config: Any, tokenizer: Any) -> Llava:
    """The starting policy of a run (see the module doc)."""
    init = config.model.init
    llava_config = with_runtime(model_config(config, tokenizer), config.model)
    if init == "checkpoint":
        if not config.model.checkpoint:
            raise ValueError("model.init='checkpoint' needs model.checkpoint (an orbax directory "
                             "from `python -m mmpo_jax.convert import`)")
        return model_io.load_model(  # straight into the run's shards
            _expand(config.model.checkpoint),
            runtime=functools.partial(with_runtime, model=config.model),
            mesh=sharding.make_mesh(dict(config.mesh)),
            rules=tuple(tuple(rule) for rule in config.mesh_rules))[0]
    if init == "random":
        return Llava(llava_config, rngs=nnx.Rngs(int(config.seed)))
    if init != "sft_base":
        raise ValueError(f"model.init={init!r}; valid: 'sft_base', 'random', 'checkpoint'")
    if config.data.dataset != SHAPES_WORLD:
        raise ValueError("model.init='sft_base' trains on the shapes world; for other datasets "
                         "use model.init='checkpoint'")
    base_config = sft_base_config(config)
    key = _digest({**sft_base_identity(config), "model": llava_config.to_dict(),
                   "tokenizer": reference_cache.tokenizer_digest(tokenizer)})
    root = _sft_base_root(config)
    directory = root / key[:16]
    model_dir = directory / "model"
    distributed.check_shared_directory(root, "sft_base.cache_dir")
    # Process 0's view decides, so that every process takes the same (collective) path.
    if distributed.broadcast("sft base cached", is_complete_model(model_dir)):
        logger.info("SFT base: using the cached model in %s", directory)
        return model_io.load_model(model_dir)[0]
    logger.info("SFT base: training %d steps into %s", base_config.train.num_steps, directory)
    source, _, image_config = load_data(base_config)
    model = train_sft_base(base_config, Llava(llava_config, rngs=nnx.Rngs(int(config.seed))),
                           tokenizer, source, image_config, directory / "run",
                           held_out=_tower_held_out(base_config))
    commit_model(model, model_dir)
    return model_io.load_model(model_dir)[0]


TOWER_HELD_OUT = 128
"""Validation images on which the pretrained tower's per-cell accuracy is logged."""


def _tower_held_out(base_config: Any) -> list[Mapping[str, Any]]:
    """The first `TOWER_HELD_OUT` records of the v2 world's ``validation_caption`` split when the
    tower is pretrained (`vision_pretrain` needs v2), else none."""
    data = base_config.data
    if not int(base_config.sft_base.vision_steps) or data.builder.to_dict().get("world") != shapes_world_v2.WORLD:
        return []  # (pretrain_vision says why a v1 world cannot pretrain the tower)
    split = load_split(data.dataset, "validation_caption", data_dir=_expand(data.data_dir),
                       **data.builder.to_dict())
    return [split[i] for i in range(min(len(split), TOWER_HELD_OUT))]


def _sft_base_root(config: Any) -> pathlib.Path:
    return _expand(config.sft_base.cache_dir or os.path.join(config.data.data_dir, "sft_base"))


def is_complete_model(model_dir: pathlib.Path) -> bool:
    """Whether the cache entry holds a whole model; ``commit_model`` writes only such entries,
    the check also refuses the half-written ones of older versions (a ``model/`` without its
    ``params/``)."""
    return ((model_dir / model_io.CONFIG_FILE).is_file()
            and (model_dir / model_io.PARAMS_DIR).is_dir())


def commit_model(model: Llava, model_dir: pathlib.Path) -> None:
    """``model_io.save_model`` (collective) into ``<model_dir>.partial``, renamed to ``model_dir``
    last by process 0; a leftover of an interrupted write and an incomplete ``model_dir`` are
    removed first (by process 0, before any process writes)."""
    partial = model_dir.with_name(f"{model_dir.name}.partial")
    if distributed.is_primary():
        if partial.exists():
            shutil.rmtree(partial)
        if model_dir.exists():
            logger.warning("SFT base: %s is incomplete (an interrupted write); rebuilding it",
                           model_dir)
            shutil.rmtree(model_dir)
    distributed.barrier(f"sft base cleared {model_dir}")
    model_io.save_model(model, partial)
    distributed.barrier(f"sft base written {model_dir}")
    if distributed.is_primary():
        os.rename(partial, model_dir)
    distributed.barrier(f"sft base committed {model_dir}")


def control_config(config: Any) -> ml_collections.ConfigDict:
    """The chosen-only SFT control: same split, steps and batch as the method run."""
    control = ml_collections.ConfigDict(config.to_dict())
    control.name = f"{config.name}_control"
    control.method = ml_collections.ConfigDict(method_defaults("sft"))
    control.optimizer.learning_rate = float(config.eval.control_learning_rate)
    control.reference.mode = "copy"
    return control


def evaluate(config: Any, model: Llava, tokenizer: Any,
             image_config: image_processing.ImageProcessorConfig, *,
             decodings: Sequence[str] | None = None,
             details: dict[str, list] | None = None) -> dict[str, float]:
    """Greedy metrics plus sampled ones (``sampled/<name>``, temperature ``eval.temperature``)
    and those of ``decodings`` (``<decoding>/<name>``; None: `evaluation_decodings`). With
    ``details``, ``details["greedy" | "sampled" | <decoding>]`` gets each pass's items
    (`runner.pass_details`)."""
    evaluation = config.eval
    data = config.data
    world = data.builder.to_dict()
    captions = load_split(data.dataset, evaluation.caption_split, data_dir=_expand(data.data_dir),
                          **world)
    pope = load_split(data.dataset, evaluation.pope_split, data_dir=_expand(data.data_dir), **world)
    if evaluation.num_captions:
        captions = [captions[i] for i in range(min(len(captions), int(evaluation.num_captions)))]
    common = dict(caption_split=captions, pope_split=pope, image_config=image_config,
                  num_image_tokens=model.config.num_image_tokens,
                  batch_size=int(evaluation.batch_size),
                  max_new_tokens=int(evaluation.max_new_tokens), seed=int(config.seed))
    sink = (lambda name: None) if details is None else (lambda name: details.setdefault(name, []))
    metrics = evaluate_model(model, tokenizer, decoding="greedy", details=sink("greedy"), **common)
    if evaluation.num_samples:
        sampled = evaluate_model(model, tokenizer, decoding="sample",
                                 num_samples=int(evaluation.num_samples),
                                 temperature=float(evaluation.temperature),
                                 details=sink("sampled"), **{**common, "pope_split": None})
        metrics.update({f"sampled/{k}": v for k, v in sampled.items()})
    for decoding in evaluation_decodings(config) if decodings is None else decodings:
        adapted = evaluate_model(model, tokenizer, decoding=decoding, details=sink(decoding),
                                 **common)
        metrics.update({f"{decoding}/{k}": v for k, v in adapted.items()})
    return metrics


def evaluation_decodings(config: Any) -> tuple[str, ...]:
    """Decodings evaluated besides greedy and sampling: ADAPT's inference for the adapt method
    (``adapt_steer``, the paper's equations)."""
    return ("adapt_steer",) if config.method.name == "adapt" else ()


SAMPLED_COLUMNS = (("chair_s", "CHAIR_s"), ("chair_i", "CHAIR_i"), ("recall", "recall"),
                   ("partner_rate", "partner"), ("sampled/chair_s", "CHAIR_s sampled"),
                   ("sampled/chair_i", "CHAIR_i sampled"), ("sampled/recall", "recall sampled"),
                   ("sampled/partner_rate", "partner sampled"),
                   ("continuation_prob", "P(continue)"), ("pope_accuracy", "POPE acc"),
                   ("pope_f1", "POPE F1"), ("pope_yes_ratio", "POPE yes"),
                   ("adapt_steer/chair_s", "CHAIR_s ADAPT"), ("adapt_steer/chair_i", "CHAIR_i ADAPT"),
                   ("adapt_steer/recall", "recall ADAPT"), ("adapt_steer/pope_f1", "POPE F1 ADAPT"))
"""The main job's table: greedy and sampled CHAIR, the bias probes, POPE."""


def _unprefixed(metrics: Mapping[str, float]) -> dict[str, float]:
    return {name.removeprefix(benchmarks.PREFIX): value for name, value in metrics.items()}


def _last_benchmarks(summary: Mapping[str, Any]) -> dict[str, float]:
    """The last benchmark evaluation of a run (its end) from its summary."""
    return _unprefixed({name: entry["last"] for name, entry in summary["metrics"].items()
                        if name.startswith(benchmarks.PREFIX)})


def run_experiment(config: Any) -> dict[str, dict[str, float]]:
    """The main job (module doc); returns ``{row name: metrics}`` in table order. With
    ``data.dataset="p2dpo_pairs"`` the pairs are generated from the initial policy first, as the
    config's ``pairs`` section says."""
    workdir = _expand(config.workdir or f"runs/{config.name}")
    return run_variants(config, {str(config.method.name): (config, workdir)}, workdir=workdir)


def prompt_source_config(config: Any) -> ml_collections.ConfigDict:
    """``config`` with its data section pointing at the prompt source of its ``pairs`` section.

    ``training.experiment.load_data`` / ``initial_model`` read it: the prompt records, their
    tokenizer and image preprocessing, and the SFT base trained on that (shapes) world.
    """
    settings = PairSettings.from_config(config.pairs)
    source = ml_collections.ConfigDict(config.to_dict())
    source.data.dataset = settings.source_dataset
    source.data.split = settings.source_split
    source.data.builder = ml_collections.ConfigDict(dict(settings.source_builder))
    source.data.manual_dir = settings.source_manual_dir
    return source


def generate_p2dpo_pairs(config: Any, base: Llava, prompts: Any, tokenizer: Any,
                         image_config: image_processing.ImageProcessorConfig,
                         output_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """P2-DPO: pairs from ``base`` on the prompt records ``prompts`` (the source of
    ``config.pairs``, loaded by the caller with its tokenizer and preprocessing) into
    ``output_dir`` (default ``data.manual_dir``), skipping shards already written; returns the
    manifest. Several processes: process 0 generates with its own copy of ``base``, the others
    wait for its manifest (``distributed.barrier_timeout``)."""
    settings = PairSettings.from_config(config.pairs)
    world = getattr(prompts, "metadata", {}).get("world")
    base = distributed.process_local(base)  # collective; generation runs on one device
    if not distributed.is_primary():  # process 0 generates and writes; its manifest comes here
        return distributed.broadcast("p2dpo manifest")
    return distributed.broadcast("p2dpo manifest", generate_pairs(
        base, tokenizer, prompts, image_config=image_config,
        output_dir=str(_expand(output_dir or config.data.manual_dir)), settings=settings,
        seed=int(config.seed),
        layout=TrainingLayout(tuple(config.data.buckets), int(config.data.max_length),
                              config.data.template),
        source_metadata={"source_dataset": settings.source_dataset,
                         "source_split": settings.source_split,
                         **({"world": world} if world is not None else {})}))


def world_config(config: Any) -> Any:
    """The config whose data section names the world of the initial model and the evaluation:
    ``config`` itself, or for P2-DPO the prompt source its pairs are generated from."""
    if config.data.dataset != "p2dpo_pairs":
        return config
    if "pairs" not in config:
        raise ValueError("data.dataset='p2dpo_pairs' needs the config's pairs section "
                         "(configs/p2dpo.py)")
    return prompt_source_config(config)


def train_variant(variant: Any, *, evaluator: benchmarks.Evaluator | None = None,
                   **kwargs: Any):
    """``train`` (benchmarks in the loop), or FiSAO's loop with the benchmarks of its final
    policy added to the returned summary (its loop takes no evaluator)."""
    if variant.method.name == "fisao":
        from mmpo_jax.training.fisao_loop import train_fisao

        result = train_fisao(variant, **kwargs)
        if evaluator is not None:
            result.summary["metrics"].update({name: {"first": value, "last": value}
                                              for name, value in evaluator(result.model).items()})
        return result
    return train(variant, evaluator=evaluator, **kwargs)


def _require_writable_dirs(config: Any, world: Any,
                           variants: Mapping[str, tuple[Any, pathlib.Path]],
                           workdir: pathlib.Path) -> None:
    """Probe every directory the job writes (module doc) before anything is loaded."""
    directories = {"workdir": workdir, **{f"the workdir of {name}": variant_dir
                                          for name, (_, variant_dir) in variants.items()}}
    if world.data.dataset == SHAPES_WORLD:
        directories["data.data_dir"] = _expand(world.data.data_dir)
    if world.model.init == "sft_base":
        directories["the SFT-base cache (sft_base.cache_dir, default <data.data_dir>/sft_base)"] = (
            _sft_base_root(world))
    if config.reference.cache_dir:
        directories["reference.cache_dir"] = _expand(config.reference.cache_dir)
    if world is not config and config.data.manual_dir:  # where the P2-DPO pairs are written
        directories["data.manual_dir"] = _expand(config.data.manual_dir)
    for role, directory in directories.items():
        require_writable(directory, role)


def run_variants(config: Any, variants: Mapping[str, tuple[Any, pathlib.Path]], *,
                 workdir: pathlib.Path) -> dict[str, dict[str, float]]:
    """Base row, one trained row per variant, the control row: the main job and sweeps.

    Args:
      config: the shared settings (data, initial model, evaluation, control).
      variants: ``{row name: (training config, its workdir)}``, all from ``config``'s data and
        initial model.
      workdir: where ``results.txt`` / ``results.json`` go.
    """
    world = world_config(config)
    _require_writable_dirs(config, world, variants, workdir)
    world_records, tokenizer, world_image_config = load_data(world)
    check_image_size(world, tokenizer, world_image_config)  # before loading or compiling
    base = initial_model(world, tokenizer)
    local = distributed.process_local  # evaluation runs a whole copy on each process's device
    if world is not config:
        manifest = generate_p2dpo_pairs(config, base, world_records, tokenizer, world_image_config)
        logger.info("P2-DPO pairs: %s", json.dumps(summarize(manifest), sort_keys=True))
    source, _, image_config = load_data(config)
    for variant, _ in variants.values():
        config_checks.validate(variant, device_count=jax.device_count(),
                               dataset_features=getattr(source, "fields", None),
                               num_records=len(source), process_count=jax.process_count(),
                               image_sizes=(image_config.crop_size,
                                            base.config.vision_config.image_size))
    variants = {name: (with_epoch_steps(variant, len(source)), variant_dir)
                for name, (variant, variant_dir) in variants.items()}
    evaluation = bool(config.eval.enabled)
    real = benchmarks.evaluator(config, tokenizer=tokenizer, image_config=image_config)
    rows: dict[str, dict[str, float]] = {}
    summaries: dict[str, Any] = {}
    initial = "base (SFT)" if config.model.init == "sft_base" else "initial"
    if evaluation:
        rows[initial] = evaluate(world, local(base), tokenizer, world_image_config)
    if real is not None:
        rows.setdefault(initial, {}).update(_unprefixed(real(base)))
    for name, (variant, variant_dir) in variants.items():
        result = train_variant(variant, model=base, tokenizer=tokenizer, source=source,
                                image_config=image_config, workdir=variant_dir, evaluator=real)
        summaries[name] = result.summary
        if evaluation:
            rows[name] = evaluate(world, local(result.model), tokenizer, world_image_config)
        if real is not None:
            rows.setdefault(name, {}).update(_last_benchmarks(result.summary))
    if evaluation and config.eval.control and config.method.name != "sft":
        control = train(with_epoch_steps(control_config(config), len(source)), model=base,
                        tokenizer=tokenizer, source=source, image_config=image_config,
                        workdir=workdir / "control", evaluator=real)
        summaries["control"] = control.summary
        rows["control (SFT on chosen)"] = evaluate(world, local(control.model), tokenizer,
                                                   world_image_config)
        if real is not None:
            rows["control (SFT on chosen)"].update(_last_benchmarks(control.summary))
    if rows and distributed.is_primary():
        table = format_table(rows, SAMPLED_COLUMNS + tuple(
            column for column in DEFAULT_COLUMNS if column not in SAMPLED_COLUMNS))
        print(table, flush=True)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "results.txt").write_text(table + "\n")
        (workdir / "results.json").write_text(json.dumps(
            {"rows": rows, "train_summaries": summaries}, indent=2, default=float))
    return rows
