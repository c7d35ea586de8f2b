"""Command line: transformers LLaVA checkpoints <-> our models (orbax model folders, training runs).

    python -m mmpo_jax.convert import <hf_dir> <orbax_dir> [--image_aspect_ratio pad] \\
        [--dtype bfloat16] [--param-dtype float32]
    python -m mmpo_jax.convert export <source> <hf_dir> [--step N] [--max-shard-gb 5]
    python -m mmpo_jax.convert export <orbax_dir> <hf_dir> --weights_only

`import` writes `engine.model_io`'s format (`config.json` + `params/`) and, beside it, the
checkpoint's tokenizer and processor (`engine.hf_export.save_processor`: tokenizer files,
`preprocessor_config.json` + `processor_config.json`, chat template, generation config), so that
training (`config.model_files`), pair generation and `python -m mmpo_jax.evaluate` all read one
preprocessing definition. `--image_aspect_ratio pad` records LLaVA-1.5's pad-to-square, which
llava-hf's processor files do not (they centre-crop); `square` records resize + centre crop; by
default the file's own setting is kept.

`export` takes as `<source>`

- a training run: its workdir (`runs/<name>`), its `checkpoints/` or `checkpoints/<N>` (the newest
  checkpoint that passes its checks, or `--step N`): the policy is rebuilt from the config saved in
  the checkpoint, its LoRA adapters merged (`training.run_model`);
- an orbax model folder (`import`'s output, the SFT-base cache): with the tokenizer and processor
  saved in it, or `--tokenizer` / `--processor` folders (`--weights_only` writes `config.json` and
  the weights alone, for a folder without either);

and writes a llava-hf directory that `AutoProcessor`, `AutoTokenizer` and
`LlavaForConditionalGeneration.from_pretrained` load (`engine.hf_export`).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from mmpo_jax.config.model_files import PROCESSOR_FILES
from mmpo_jax.data.image_processing import IMAGE_ASPECT_RATIOS, from_pretrained_dir
from mmpo_jax.data.tokenizer import TOKENIZER_CONFIG, load_tokenizer
from mmpo_jax.engine import loading
from mmpo_jax.engine.checkpointing import export_policy
from mmpo_jax.engine.hf_export import save_processor
from mmpo_jax.engine.model_io import load_model, save_model
from mmpo_jax.models.convert import load_hf_llava, save_hf_llava
from mmpo_jax.training import run_model

PROG = "python -m mmpo_jax.convert"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_orbax = commands.add_parser("import", help="transformers LLaVA directory -> orbax model folder")
    to_orbax.add_argument("hf_dir", type=pathlib.Path)
    to_orbax.add_argument("orbax_dir", type=pathlib.Path)
    to_orbax.add_argument("--image_aspect_ratio", choices=IMAGE_ASPECT_RATIOS,
                          help="pad: LLaVA-1.5's pad-to-square; square: resize + centre crop "
                               "(default: the processor file's)")
    to_orbax.add_argument("--dtype", default="float32", help="compute dtype stored in the config")
    to_orbax.add_argument("--param-dtype", default="float32", help="parameter storage dtype")
    to_hf = commands.add_parser("export", help="training run or orbax model folder -> transformers "
                                               "LLaVA directory")
    to_hf.add_argument("source", type=pathlib.Path,
                       help="a run's workdir, its checkpoints/ or checkpoints/<N>, or an orbax "
                            "model folder")
    to_hf.add_argument("hf_dir", type=pathlib.Path)
    to_hf.add_argument("--step", type=int, help="the run's checkpoint to export (default: newest)")
    to_hf.add_argument("--tokenizer", type=pathlib.Path,
                       help="orbax folder only: tokenizer folder (default: the orbax folder)")
    to_hf.add_argument("--processor", type=pathlib.Path,
                       help="orbax folder only: processor folder or file (default: the orbax folder)")
    to_hf.add_argument("--weights_only", action="store_true",
                       help="orbax folder only: write config.json and the weights alone (no tokenizer "
                            "or processor: transformers then cannot build the model's inputs)")
    to_hf.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard, GiB")
    return parser


def import_checkpoint(hf_dir: pathlib.Path, orbax_dir: pathlib.Path, *, image_aspect_ratio: str | None,
                      dtype: str = "float32", param_dtype: str = "float32") -> bool:
    """`import` (module doc); returns whether the tokenizer and processor were saved too (False
    when `hf_dir` holds neither, e.g. weights only). The processor files are read, and checked
    against the model, before anything is written."""
    has_files = (hf_dir / TOKENIZER_CONFIG).is_file() and _has_processor(hf_dir)
    if not has_files and (image_aspect_ratio or (hf_dir / TOKENIZER_CONFIG).is_file() or _has_processor(hf_dir)):
        raise SystemExit(f"{PROG} import: {hf_dir} needs both a tokenizer ({TOKENIZER_CONFIG}) and a "
                         f"processor ({' / '.join(PROCESSOR_FILES)}) to save them "
                         "beside the model")
    model, config = load_hf_llava(hf_dir, dtype=dtype, param_dtype=param_dtype)
    if has_files:
        tokenizer = load_tokenizer(hf_dir)
        image_config = from_pretrained_dir(hf_dir, image_aspect_ratio=image_aspect_ratio)
        save_processor(orbax_dir, config=config, tokenizer=tokenizer, image_config=image_config)
    save_model(model, orbax_dir)
    return has_files


def _has_processor(directory: pathlib.Path) -> bool:
    return any((directory / name).is_file() for name in PROCESSOR_FILES)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point; `argv` defaults to `sys.argv[1:]`."""
    args = _parser().parse_args(argv)
    if args.command == "import":
        with_files = import_checkpoint(args.hf_dir, args.orbax_dir, image_aspect_ratio=args.image_aspect_ratio,
                                       dtype=args.dtype, param_dtype=args.param_dtype)
        note = "" if with_files else (f" (weights only: {args.hf_dir} has no tokenizer or processor; set "
                                      "--config.data.tokenizer to a llava-hf folder when training)")
        print(f"import: wrote {args.orbax_dir}{note}", file=sys.stderr)
        return
    if run_model.is_run(args.source):
        if args.tokenizer or args.processor or args.weights_only:
            raise SystemExit(f"{PROG} export: --tokenizer / --processor / --weights_only are for an orbax "
                             "model folder; a training run exports the tokenizer and processor it was "
                             "trained with")
        run_model.export_run(args.source, args.hf_dir, step=args.step,
                             max_shard_bytes=int(args.max_shard_gb * 2**30))
    else:
        if args.step is not None:
            raise SystemExit(f"{PROG} export: --step needs a training run, and {args.source} is none "
                             "(expected its workdir, checkpoints/ or checkpoints/<N>)")
        max_shard_bytes = int(args.max_shard_gb * 2**30)
        if args.weights_only:
            model, config = load_model(args.source)
            save_hf_llava(model, config, args.hf_dir, max_shard_bytes=max_shard_bytes)
            print(f"export: wrote {args.hf_dir} (weights only)", file=sys.stderr)
            return
        try:
            model, tokenizer, image_config = loading.load_model(args.source, tokenizer=args.tokenizer,
                                                                processor=args.processor)
        except FileNotFoundError as error:
            raise SystemExit(f"{PROG} export: {error}") from None
        export_policy(model, args.hf_dir, tokenizer=tokenizer, image_config=image_config,
                      template="llava_1_5", max_shard_bytes=max_shard_bytes)
    print(f"export: wrote {args.hf_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
