"""A saved model with its tokenizer and image preprocessing, for evaluation.

`load_model(directory)` reads

- an orbax model directory (`config.json` + `params/`, written by `python -m mmpo_jax.convert
  import`), or
- a transformers LLaVA directory (`config.json` + safetensors: a llava-hf checkpoint or our export),

and the tokenizer and image preprocessing saved beside it (an export and a llava-hf checkpoint
hold both; an orbax directory holds them when the files were saved into it, e.g. with
`engine.hf_export.save_processor`), or from the directories given. The preprocessing is read with
`image_processing.from_pretrained_dir`, the definition training and pair generation use too.

`evaluate`'s command line takes the loader as an argument, so a loader for other checkpoints
(the trainer's, LoRA merged) can replace this one with the same signature.
"""

from __future__ import annotations

import os
import pathlib
from typing import Protocol

from transformers import PreTrainedTokenizerBase

from mmpo_jax.data.image_processing import ImageProcessorConfig, from_pretrained_dir
from mmpo_jax.data.tokenizer import load_tokenizer
from mmpo_jax.engine.model_io import load_model as load_orbax_model
from mmpo_jax.models.convert import SAFETENSORS_FILE, SAFETENSORS_INDEX, load_hf_llava
from mmpo_jax.engine.hf_export import check_compatible
from mmpo_jax.models.llava import Llava

ORBAX_PARAMS = "params"


class ModelLoader(Protocol):
    """`(directory, *, tokenizer, processor, image_aspect_ratio) -> (model, tokenizer, preprocessing)`."""

    def __call__(self, directory: str | os.PathLike[str], *, tokenizer: str | os.PathLike[str] | None = None,
                 processor: str | os.PathLike[str] | None = None, image_aspect_ratio: str | None = None,
                 ) -> tuple[Llava, PreTrainedTokenizerBase, ImageProcessorConfig]: ...


def load_model(directory: str | os.PathLike[str], *, tokenizer: str | os.PathLike[str] | None = None,
               processor: str | os.PathLike[str] | None = None, image_aspect_ratio: str | None = None,
               ) -> tuple[Llava, PreTrainedTokenizerBase, ImageProcessorConfig]:
    """(model, tokenizer, image preprocessing) of a saved model (module docstring).

    Args:
      directory: the orbax or transformers model directory.
      tokenizer: the tokenizer's directory; default `directory`.
      processor: the processor's directory or config file; default `directory`.
      image_aspect_ratio: "pad" / "square" to override the processor's setting (LLaVA-1.5 was
        trained with "pad", which llava-hf's processor files do not record).

    Raises:
      FileNotFoundError: no model, tokenizer or processor where looked; the message names the flag.
      ValueError: a tokenizer or preprocessing that does not fit the model.
    """
    directory = pathlib.Path(directory).expanduser()
    if (directory / ORBAX_PARAMS).is_dir():
        model, config = load_orbax_model(directory)
    elif (directory / SAFETENSORS_FILE).is_file() or (directory / SAFETENSORS_INDEX).is_file():
        model, config = load_hf_llava(directory)
    else:
        raise FileNotFoundError(f"{directory} holds neither an orbax model ({ORBAX_PARAMS}/ and config.json, from "
                                "`python -m mmpo_jax.convert import`) nor a transformers LLaVA checkpoint")
    tokenizer_dir = pathlib.Path(tokenizer).expanduser() if tokenizer else directory
    try:
        loaded_tokenizer = load_tokenizer(tokenizer_dir)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}; pass --tokenizer (e.g. the llava-hf checkpoint the model was "
                                "imported from)") from None
    try:
        image_config = from_pretrained_dir(pathlib.Path(processor).expanduser() if processor else directory,
                                           image_aspect_ratio=image_aspect_ratio)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{error}; pass --processor (e.g. the llava-hf checkpoint the model was "
                                "imported from)") from None
    check_compatible(config, loaded_tokenizer, image_config)
    return model, loaded_tokenizer, image_config
