"""Command line: hallucination metrics (CHAIR, POPE, AMBER) of a saved model, printed as a table.

Real data (published files; any combination of the benchmarks):

    python -m mmpo_jax.evaluate --checkpoint DIR [--tokenizer DIR] [--processor DIR] \\
        [--image_aspect_ratio pad] \\
        --coco_instances annotations/instances_val2014.json --coco_images val2014/ \\
            [--coco_captions annotations/captions_val2014.json] [--num_caption_images 500] \\
        --pope_questions coco_pope_random.json coco_pope_popular.json coco_pope_adversarial.json \\
            --pope_images val2014/ \\
        --amber_dir AMBER/data --amber_images AMBER/image [--amber_queries query/query_all.json]

    # CHAIR of a held-out slice of a prepared preference set whose images are COCO images
    python -m mmpo_jax.evaluate --checkpoint DIR --coco_instances instances_train2014.json \\
        --heldout_dataset rlhf_v --heldout_split "train[95%:]" --data_dir ~/mmpo_data

The shapes world (no real-data flag): CHAIR on `test_caption`, POPE on `test_pope`, the partner
rate and the continuation probability, the world built under `--data_dir` if absent:

    python -m mmpo_jax.evaluate --checkpoint DIR [--data_dir DIR] [--decoding sample --num_samples 4]

`--checkpoint` is an orbax directory written by `python -m mmpo_jax.convert import`, a
transformers LLaVA directory (a llava-hf checkpoint, or an export), or a training run (its
workdir: the newest checkpoint; or `runs/<name>/checkpoints/<N>`), whose policy is rebuilt from
the checkpoint with LoRA merged and the tokenizer and preprocessing it was trained with
(`training.run_model`). For the first two the tokenizer and processor are read from the directory
unless `--tokenizer` / `--processor` name other directories (`engine.loading.load_model`).
`--image_aspect_ratio pad` gives LLaVA-1.5's pad-to-square, which llava-hf's processor files do
not record (`convert import --image_aspect_ratio pad` records it); use what the model was trained
with.
Metric names: `evaluation.suite`.

Bad flags are named before the model loads, all at once, in one line without a traceback: an
incomplete benchmark (`--pope_questions` without `--pope_images`, ...) and every path flag naming
nothing (`--checkpoint`, `--tokenizer`, `--processor`, the benchmark files and folders).

On a TPU pod slice (or any job of several processes) run the same command on every host: the
processes start `jax.distributed` (detected, or `--coordinator host:port --num_processes N
--process_id i`), each evaluates a whole copy of the model on its first device, and process 0
prints and writes the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import re
from collections.abc import Sequence

from mmpo_jax.config.loading import world_options
from mmpo_jax.data import image_processing
from mmpo_jax.data.sources import load_split
from mmpo_jax.data.tokenizer import load_tokenizer
from mmpo_jax.engine import distributed
from mmpo_jax.engine.model_io import load_model as load_orbax_model
from mmpo_jax.evaluation import suite
from mmpo_jax.engine.loading import ModelLoader, load_model
from mmpo_jax.engine.reference import merged_copy
from mmpo_jax.training import run_model
from mmpo_jax.evaluation.records import Head
from mmpo_jax.evaluation.runner import DECODINGS, evaluate_model
from mmpo_jax.evaluation.table import format_table

REAL_DATA_FLAGS = ("coco_images", "heldout_dataset", "pope_questions", "amber_dir")
# path flag -> what it must name ("dir", "file" or "any"); --amber_queries lie in --amber_dir
PATH_FLAGS = {"checkpoint": "dir", "tokenizer": "dir", "processor": "any",
              "coco_instances": "file", "coco_captions": "file", "coco_images": "dir",
              "heldout_manual_dir": "dir", "pope_questions": "file", "pope_images": "dir",
              "amber_dir": "dir", "amber_images": "dir"}
_SPEC_FIELDS = tuple(field.name for field in dataclasses.fields(suite.EvaluationSpec))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mmpo_jax.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default = suite.EvaluationSpec.__dataclass_fields__
    model = parser.add_argument_group("model")
    model.add_argument("--checkpoint", type=pathlib.Path, required=True,
                       help="orbax model directory (convert import) or transformers LLaVA directory")
    model.add_argument("--tokenizer", type=pathlib.Path, help="tokenizer directory (default: --checkpoint)")
    model.add_argument("--processor", type=pathlib.Path,
                       help="processor directory or its processor_config.json / preprocessor_config.json "
                            "(default: --checkpoint)")
    model.add_argument("--image_aspect_ratio", choices=image_processing.IMAGE_ASPECT_RATIOS,
                       help="pad: LLaVA-1.5's pad-to-square; square: resize + centre crop (default: the processor's)")
    coco = parser.add_argument_group("CHAIR on COCO")
    coco.add_argument("--coco_instances", help="COCO instances_*.json (ground truth)")
    coco.add_argument("--coco_captions", help="COCO captions_*.json (adds the objects its captions name)")
    coco.add_argument("--coco_images", help="folder of the annotation file's images: caption them")
    coco.add_argument("--caption_prompt", default=default["caption_prompt"].default)
    coco.add_argument("--num_caption_images", type=int, help="a seeded sample of this many images (default: all)")
    coco.add_argument("--heldout_dataset", help="prepared preference dataset whose held-out split is captioned")
    coco.add_argument("--heldout_split", help='its split, e.g. "train[95%%:]"')
    coco.add_argument("--heldout_manual_dir", help="its published files (to prepare it)")
    coco.add_argument("--heldout_image_key", default=default["heldout_image_key"].default,
                      help="metadata field naming each record's image file")
    coco.add_argument("--heldout_own_prompt", action="store_true",
                      help="ask each record's own prompt, not --caption_prompt")
    pope = parser.add_argument_group("POPE")
    pope.add_argument("--pope_questions", nargs="+", default=(), help="POPE question files (jsonl)")
    pope.add_argument("--pope_images", help="folder of the POPE questions' images")
    amber = parser.add_argument_group("AMBER")
    amber.add_argument("--amber_dir", help="AMBER's data/ folder (annotations.json, relation.json, safe_words.txt)")
    amber.add_argument("--amber_queries", nargs="+", default=default["amber_queries"].default,
                       help="query files, relative to --amber_dir (default: all queries)")
    amber.add_argument("--amber_images", help="folder of AMBER's images")
    amber.add_argument("--question_suffix", default="", help="appended to every POPE and AMBER yes/no question")
    shapes = parser.add_argument_group("shapes world (when no real-data benchmark is given)")
    shapes.add_argument("--data_dir", type=pathlib.Path, default=pathlib.Path("~/mmpo_data").expanduser(),
                        help="root of prepared datasets (shapes world, held-out splits)")
    shapes.add_argument("--world", action="append", default=[], metavar="KEY=VALUE",
                        help="shapes-world option (a WorldSpec field), e.g. --world p=0.5; repeatable")
    shapes.add_argument("--max_new_tokens", type=int, default=32, help="decode budget on the shapes world")
    decoding = parser.add_argument_group("decoding")
    decoding.add_argument("--decoding", choices=DECODINGS, default="greedy",
                          help="greedy, sample (--num_samples passes at --temperature), or greedy under ADAPT's "
                               "attention-supervised inference (adapt_steer, adapt_blend, adapt_mask)")
    decoding.add_argument("--num_samples", type=int, default=1)
    decoding.add_argument("--temperature", type=float, default=1.0)
    decoding.add_argument("--batch_size", type=int, default=16)
    decoding.add_argument("--caption_max_new_tokens", type=int, default=default["caption_max_new_tokens"].default)
    decoding.add_argument("--answer_max_new_tokens", type=int, default=default["answer_max_new_tokens"].default)
    decoding.add_argument("--seed", type=int, default=0)
    decoding.add_argument("--max_examples", type=int, help="evaluate only the first N records of each benchmark")
    job = parser.add_argument_group("several processes (hosts of a pod slice; engine.distributed)")
    job.add_argument("--distributed", choices=distributed.MODES, default="auto",
                     help="auto: start jax.distributed when the flags below or a detected cluster "
                          "say so; off: one process")
    job.add_argument("--coordinator", default="", help="host:port of process 0")
    job.add_argument("--num_processes", type=int, default=0)
    job.add_argument("--process_id", type=int, default=-1)
    output = parser.add_argument_group("output")
    output.add_argument("--name", default="model", help="row name in the printed table")
    output.add_argument("--output", type=pathlib.Path, help="also write the metrics here as JSON")
    return parser


def path_problems(args: argparse.Namespace) -> list[str]:
    """Every path flag given that names no file or folder of the kind it needs."""
    nouns = {"dir": "folder", "file": "file", "any": "file or folder"}
    problems = []
    for flag, kind in PATH_FLAGS.items():
        value = getattr(args, flag, None)
        for path in (value if isinstance(value, (list, tuple)) else [value]):
            target = None if path is None else pathlib.Path(path).expanduser()
            if target is None or (target.exists() and kind == "any"):
                continue
            if not target.exists():
                problems.append(f"--{flag} {path}: no such {nouns[kind]}")
            elif target.is_dir() != (kind == "dir"):
                problems.append(f"--{flag} {path}: not a {nouns[kind]}")
    return problems


def spec_from_args(args: argparse.Namespace) -> suite.EvaluationSpec:
    """The evaluation spec of the command line; a bad combination exits naming the flags, with
    every path flag that names nothing (`path_problems`)."""
    fields = {name: getattr(args, name) for name in _SPEC_FIELDS if hasattr(args, name)}
    fields["heldout_data_dir"] = str(args.data_dir)
    try:
        spec, problems = suite.EvaluationSpec(**fields), []
    except ValueError as error:
        spec, problems = None, [re.sub(rf"\b({'|'.join(_SPEC_FIELDS)})\b", r"--\1", str(error))]
    _exit_if(problems + path_problems(args))
    return spec


def _exit_if(problems: list[str]) -> None:
    if problems:
        raise SystemExit("python -m mmpo_jax.evaluate: " + "; ".join(problems))


def _shapes_world(args: argparse.Namespace) -> dict[str, float]:
    _exit_if(path_problems(args))
    world = world_options(args.world)
    model, config = load_orbax_model(args.checkpoint)
    caption_split = distributed.primary_first("prepare shapes_world", lambda: load_split(
        "shapes_world", "test_caption", data_dir=args.data_dir, **world))
    pope_split = load_split("shapes_world", "test_pope", data_dir=args.data_dir, **world)
    return evaluate_model(
        model, load_tokenizer(caption_split.tokenizer_path), caption_split=Head(caption_split, args.max_examples),
        pope_split=Head(pope_split, args.max_examples),
        image_config=image_processing.tiny(caption_split.metadata["world"]["image_size"]),
        num_image_tokens=config.num_image_tokens, decoding=args.decoding, num_samples=args.num_samples,
        temperature=args.temperature, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        seed=args.seed, task="shapes_world")


def load_model_or_run(directory, *, tokenizer=None, processor=None, image_aspect_ratio=None):
    """`engine.loading.load_model`, or for a training run (`training.run_model.is_run`) its
    checkpoint's policy (LoRA merged) with the tokenizer and preprocessing it was trained with."""
    if not run_model.is_run(directory):
        return load_model(directory, tokenizer=tokenizer, processor=processor,
                          image_aspect_ratio=image_aspect_ratio)
    if tokenizer or processor or image_aspect_ratio:
        raise SystemExit("python -m mmpo_jax.evaluate: --tokenizer / --processor / "
                         f"--image_aspect_ratio are not for a training run ({directory}): it is "
                         "evaluated with what it was trained with")
    run = run_model.load_run_model(directory)
    return merged_copy(run.model), run.tokenizer, run.image_config


def main(argv: Sequence[str] | None = None, *, loader: ModelLoader = load_model_or_run) -> dict[str, float]:
    """Entry point; `argv` defaults to `sys.argv[1:]`. Prints the table and returns the metrics.

    `loader` reads `--checkpoint` (with `--tokenizer`, `--processor`, `--image_aspect_ratio`) into
    (model, tokenizer, image preprocessing); see `evaluation.loading.load_model`.
    """
    args = _parser().parse_args(argv)
    try:
        distributed.initialize(distributed.Settings(
            mode=args.distributed, coordinator=args.coordinator,
            num_processes=args.num_processes, process_id=args.process_id))
    except ValueError as error:
        raise SystemExit(f"python -m mmpo_jax.evaluate: {error}") from None
    if any(getattr(args, flag) for flag in REAL_DATA_FLAGS):
        spec = spec_from_args(args)  # checked before the model is loaded
        model, tokenizer, image_config = loader(args.checkpoint, tokenizer=args.tokenizer, processor=args.processor,
                                                image_aspect_ratio=args.image_aspect_ratio)
        metrics = suite.evaluate(model, tokenizer, image_config, spec)
    else:
        metrics = _shapes_world(args)
    if not distributed.is_primary():
        return metrics
    print(format_table({args.name: metrics}))
    if args.output is not None:
        args.output.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


if __name__ == "__main__":
    try:
        distributed.exit_together(main)()
    except FileNotFoundError as error:  # an input the flags name lacks a file: one line
        raise SystemExit(f"python -m mmpo_jax.evaluate: {error}") from None
