"""Where a run reads its model's tokenizer and image preprocessing: one definition per model.

Training, P2-DPO's pair generation, in-training evaluation and the export all take the tokenizer
and the image preprocessing from here (`training.experiment.load_data` calls it), and
``python -m mmpo_jax.evaluate`` reads the same files (`engine.loading`):

- tokenizer: ``data.tokenizer`` when set; else the ``model.checkpoint`` folder when it holds one
  (``python -m mmpo_jax.convert import`` saves the llava-hf tokenizer there); else the one the
  dataset ships (the shapes world);
- image preprocessing, for ``model.init="checkpoint"`` on data other than the shapes world: the
  processor files (``processor_config.json`` / ``preprocessor_config.json``, transformers 5 and 4
  layouts) in the ``model.checkpoint`` folder (saved there by ``convert import``), else in the
  ``data.tokenizer`` folder (a llava-hf checkpoint folder holds both), read with
  `image_processing.from_pretrained_dir`; ``data.image_aspect_ratio`` ("pad": LLaVA-1.5's
  pad-to-square, "square": resize + centre crop) overrides the file's choice, "" keeps it.
  The shapes world (and pairs generated from it) uses its own preset
  (`image_processing.for_shapes_world`: its image size, v2's CLIP constants); a randomly
  initialised model on real data CLIP ViT-L/14-336 (`image_processing.clip_vit_l_336`, padded
  unless "square").

``data.image_size`` then resizes whichever was chosen (the same steps at another size).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from typing import Any

from mmpo_jax.data import image_processing
from mmpo_jax.data.tokenizer import TOKENIZER_CONFIG

PROCESSOR_FILES = (image_processing.PROCESSOR_CONFIG, image_processing.PREPROCESSOR_CONFIG)


def _expand(path: str) -> pathlib.Path:
    return pathlib.Path(os.path.expanduser(path))


def tokenizer_dir(tree: Mapping[str, Any], shipped: str | None = None) -> pathlib.Path | None:
    """The tokenizer folder of a `plain` config (module doc); ``shipped`` is the dataset's own
    tokenizer folder (or None). None when there is none."""
    data, model = tree["data"], tree["model"]
    if data["tokenizer"]:
        return _expand(data["tokenizer"])
    if model["init"] == "checkpoint" and model["checkpoint"]:
        folder = _expand(model["checkpoint"])
        if (folder / TOKENIZER_CONFIG).is_file():
            return folder
    return pathlib.Path(shipped) if shipped else None


def processor_dir(tree: Mapping[str, Any]) -> pathlib.Path | None:
    """The folder whose processor files define the preprocessing of a `plain` config with
    ``model.init="checkpoint"`` (module doc), or None when neither candidate holds them."""
    candidates = [tree["model"]["checkpoint"], tree["data"]["tokenizer"]]
    for candidate in filter(None, candidates):
        folder = _expand(candidate)
        if any((folder / name).is_file() for name in PROCESSOR_FILES):
            return folder
    return None


def reads_processor_files(tree: Mapping[str, Any], world: Mapping[str, Any] | None) -> bool:
    """Whether the run's preprocessing comes from processor files (a checkpoint on real data);
    ``world`` is the dataset's shapes-world metadata, None for real data."""
    return world is None and tree["model"]["init"] == "checkpoint"


def image_config(tree: Mapping[str, Any], world: Mapping[str, Any] | None
                 ) -> image_processing.ImageProcessorConfig:
    """The image preprocessing of a `plain` config (module doc); ``world`` as in
    `reads_processor_files`.

    Raises:
      FileNotFoundError: a checkpoint run on real data with no processor files where looked; the
        message names the flags.
      ValueError: processor files this package cannot follow, or a bad ``data.image_aspect_ratio``.
    """
    data = tree["data"]
    aspect = data["image_aspect_ratio"] or None
    if world is not None:
        config = image_processing.for_shapes_world(world)  # v2: CLIP's constants
    elif reads_processor_files(tree, world):
        folder = processor_dir(tree)
        if folder is None:
            raise FileNotFoundError(processor_missing(tree))
        config = image_processing.from_pretrained_dir(folder, image_aspect_ratio=aspect)
    else:
        config = image_processing.clip_vit_l_336(
            pad_to_square=image_processing.pads_to_square(aspect or "pad"))
    if data["image_size"]:
        config = dataclasses.replace(config, size=int(data["image_size"]),
                                     crop_size=int(data["image_size"]))
    return config


def processor_missing(tree: Mapping[str, Any]) -> str:
    """The one-line problem of a checkpoint run whose processor files are nowhere."""
    model, data = tree["model"], tree["data"]
    return (f"no {' or '.join(PROCESSOR_FILES)} in "
            f"--config.model.checkpoint={model['checkpoint']!r}"
            + (f" or --config.data.tokenizer={data['tokenizer']!r}" if data["tokenizer"] else "")
            + ": the image preprocessing is read from the model's processor files; import the "
            "model with `python -m mmpo_jax.convert import <llava-hf folder> <orbax folder> "
            "--image_aspect_ratio pad` (which saves them), or set --config.data.tokenizer to the "
            "llava-hf folder")
