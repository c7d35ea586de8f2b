"""Command line: hallucination metrics (CHAIR, POPE) of a saved model, printed as a table.

    python -m mmpo_jax.evaluate --checkpoint DIR [--data_dir DIR] [--decoding sample --num_samples 4]
    python -m mmpo_jax.evaluate --checkpoint DIR --decoding adapt_steer   # or adapt_blend, adapt_mask
    python -m mmpo_jax.evaluate --checkpoint DIR --tokenizer DIR --preprocessor_config FILE \\
        --pope_questions coco_pope_random.json coco_pope_adversarial.json --pope_images val2014/

`--checkpoint` is an orbax directory written by `python -m mmpo_jax.convert import` (or the
trainer). Without `--pope_questions` the model is evaluated on the shapes world under `--data_dir`
(built there if absent): CHAIR on `test_caption`, POPE on `test_pope`, the partner rate and the
continuation probability. With `--pope_questions` (published POPE jsonl files, the split read from
each file name) it runs POPE on real images with the given tokenizer and image processor.
"""

from __future__ import annotations

import argparse
import json
import pathlib
from collections.abc import Sequence

from mmpo_jax.engine.model_io import load_model
from mmpo_jax.data import image_processing
from mmpo_jax.data.sources import load_split
from mmpo_jax.data.tokenizer import load_tokenizer
from mmpo_jax.evaluation.pope import pope_records
from mmpo_jax.evaluation.runner import DECODINGS, evaluate_model
from mmpo_jax.evaluation.table import format_table


class _Concatenated(Sequence):
    """Several record sequences read as one."""

    def __init__(self, parts: Sequence[Sequence]):
        self.parts = list(parts)

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)

    def __getitem__(self, index: int):
        for part in self.parts:
            if index < len(part):
                return part[index]
            index -= len(part)
        raise IndexError(index)


class _Head(Sequence):
    """The first `count` records of a sequence (all when `count` is None)."""

    def __init__(self, records: Sequence, count: int | None):
        self.records, self.count = records, len(records) if count is None else min(count, len(records))

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        if not 0 <= index < self.count:
            raise IndexError(index)
        return self.records[index]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mmpo_jax.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=pathlib.Path, required=True, help="orbax model directory")
    parser.add_argument("--data_dir", type=pathlib.Path, default=pathlib.Path("~/mmpo_data").expanduser(),
                        help="root of prepared datasets (shapes world)")
    parser.add_argument("--world", action="append", default=[], metavar="KEY=VALUE",
                        help="shapes-world option (a WorldSpec field), e.g. --world p=0.5; repeatable")
    parser.add_argument("--tokenizer", type=pathlib.Path, help="saved tokenizer directory (real data)")
    parser.add_argument("--preprocessor_config", type=pathlib.Path,
                        help="transformers preprocessor_config.json of the model (real data)")
    parser.add_argument("--pope_questions", type=pathlib.Path, nargs="+", help="POPE question files (jsonl)")
    parser.add_argument("--pope_images", type=pathlib.Path, help="folder of the POPE questions' images")
    parser.add_argument("--decoding", choices=DECODINGS, default="greedy",
                        help="greedy, sample (--num_samples passes at --temperature), or greedy under ADAPT's "
                             "attention-supervised inference (adapt_steer, adapt_blend, adapt_mask)")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max_examples", type=int, help="evaluate only the first N records of each split")
    parser.add_argument("--name", default="model", help="row name in the printed table")
    parser.add_argument("--output", type=pathlib.Path, help="also write the metrics here as JSON")
    return parser


def _world_options(pairs: Sequence[str]) -> dict[str, object]:
    """["p=0.5", "seed=3"] -> {"p": 0.5, "seed": 3} (values read as JSON, else kept as text)."""
    options: dict[str, object] = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise SystemExit(f"--world {pair!r} is not KEY=VALUE (e.g. --world p=0.5)")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Entry point; `argv` defaults to `sys.argv[1:]`. Prints the table and returns the metrics."""
    args = _parser().parse_args(argv)
    if args.pope_questions:
        missing = [flag for flag in ("tokenizer", "preprocessor_config", "pope_images") if getattr(args, flag) is None]
        if missing:
            raise SystemExit(f"--pope_questions needs {', '.join('--' + m for m in missing)} as well")
    world = _world_options(args.world)
    model, config = load_model(args.checkpoint)
    if args.pope_questions:
        tokenizer = load_tokenizer(args.tokenizer)
        image_config = image_processing.from_hf_preprocessor_config(json.loads(args.preprocessor_config.read_text()))
        caption_split = None
        pope_split = _Concatenated([pope_records(path, args.pope_images) for path in args.pope_questions])
        task = "coco"
    else:
        caption_split = load_split("shapes_world", "test_caption", data_dir=args.data_dir, **world)
        pope_split = load_split("shapes_world", "test_pope", data_dir=args.data_dir, **world)
        tokenizer = load_tokenizer(caption_split.tokenizer_path)
        image_config = image_processing.tiny(caption_split.metadata["world"]["image_size"])
        task = "shapes_world"
    metrics = evaluate_model(
        model, tokenizer,
        caption_split=None if caption_split is None else _Head(caption_split, args.max_examples),
        pope_split=_Head(pope_split, args.max_examples),
        image_config=image_config, num_image_tokens=config.num_image_tokens, decoding=args.decoding,
        num_samples=args.num_samples, temperature=args.temperature, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, seed=args.seed, task=task,
    )
    print(format_table({args.name: metrics}))
    if args.output is not None:
        args.output.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return metrics


if __name__ == "__main__":
    main()
