"""One record to the fields of one batch row: tokens per response, images, per-method extras.

A row function returns ``(fields, drop reason or None, truncated)``. A record the template cannot
encode, longer than the largest bucket, or with a response longer than ``max_length`` under
``too_long="skip"``, gets a drop reason (the pipeline makes it a padding row); under
``too_long="truncate"`` (the default) such a response is cut from its end and the row is marked
truncated. [our choice] truncate by default, as LLaVA's and TRL's trainers do: a pair whose
responses run past a 2048-token bucket still teaches its first 2000 tokens, and the counts the
pipeline logs say how often it happens.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import numpy as np

from mmpo_jax.data import template as template_lib
from mmpo_jax.data.example_randomness import INTERVENTIONS, intervene, noise_key, stored_noise
from mmpo_jax.data.image_processing import ImageProcessorConfig

EXTRAS = ("corrupt_pixel_values", "noise_pixel_values", "focus_images", "focus_two_images",
          "robust_pair", "ddw_clip", "ref_logps")
"""Per-method extras ``preference_pipeline`` can add (see ``Batch`` for the fields they fill).
``robust_pair`` adds the robustness pair's tokens and the ``I_noise`` it was generated on
(``robust_noise_pixel_values``, from the record's ``noise_key``); ``focus_two_images`` the
two-image ``I_aug`` (image and crop) with the focus pair after the record's ``focus_aug_prompt``."""

LONGER_THAN_BUCKETS = "longer_than_largest_bucket"
RESPONSE_TOO_LONG = "response_longer_than_max_length"
TOO_LONG_POLICIES = ("truncate", "skip")


def encode_texts(encode: Callable[[str, str], Any], prompt: str, responses: Mapping[str, str],
                 largest_bucket: int, too_long: str
                 ) -> tuple[dict[str, np.ndarray], str | None, bool]:
    """Token fields for each ``group -> response`` with one prompt, or the first drop reason; and
    whether a response was truncated to ``max_length`` (``too_long="truncate"``)."""
    fields, truncated = {}, False
    for group, response in responses.items():
        encoded = encode(prompt, response)
        if isinstance(encoded, template_lib.DropReason):
            return {}, encoded.name, False
        if len(encoded.input_ids) > largest_bucket:
            return {}, LONGER_THAN_BUCKETS, False
        if encoded.truncated and too_long == "skip":
            return {}, RESPONSE_TOO_LONG, False
        truncated = truncated or encoded.truncated
        prefix = f"{group}_" if group else ""
        fields[f"{prefix}input_ids"] = np.asarray(encoded.input_ids, np.int32)
        fields[f"{prefix}loss_mask"] = np.asarray(encoded.loss_mask, np.int32)
    return fields, None, truncated


def preference_row(record: Mapping[str, Any], *, epoch: int, record_index: int, seed: int,
                   encode: Callable[[str, str], Any], image_config: ImageProcessorConfig,
                   extras: frozenset[str], largest_bucket: int, too_long: str
                   ) -> tuple[dict[str, np.ndarray], str | None, bool]:
    """The batch fields of one preference record, or the reason it is dropped; and whether a
    response was truncated."""
    responses = {"chosen": record["chosen"], "rejected": record["rejected"]}
    if "robust_pair" in extras:
        responses.update(robust_chosen=record["robust_chosen"],
                         robust_rejected=record["robust_rejected"])
    fields, reason, truncated = encode_texts(encode, record["prompt"], responses, largest_bucket,
                                             too_long)
    if reason is None and "focus_two_images" in extras:  # the pair after P_enh, two images
        two_images, reason, also = encode_texts(
            functools.partial(encode, num_images=2), record["focus_aug_prompt"],
            {"focus_aug_chosen": record["chosen"], "focus_aug_rejected": record["rejected"]},
            largest_bucket, too_long)
        fields.update(two_images)
        truncated = truncated or also
    if reason is not None:
        return fields, reason, False
    pixel_values = image_config(record["image"])
    fields["pixel_values"] = pixel_values
    fields["example_index"] = np.int32(record_index)
    for name in sorted(extras & INTERVENTIONS.keys()):
        fields[name] = intervene(name, pixel_values, seed=seed, epoch=epoch,
                                 record_index=record_index, image_config=image_config)
    if "robust_pair" in extras:
        fields["robust_noise_pixel_values"] = stored_noise(record, pixel_values, image_config)
    if "focus_images" in extras:
        fields["focus_aug_pixel_values"] = image_config(record["focus_aug_image"])
        fields["focus_deg_pixel_values"] = image_config(record["focus_deg_image"])
    if "focus_two_images" in extras:
        fields["focus_pair_pixel_values"] = np.stack(
            [pixel_values, image_config(record["focus_aug_image"])])
    for extra, names in (("ddw_clip", ("ddw_clip_crop", "ddw_clip_full")),
                         ("ref_logps", ("ref_chosen_logps", "ref_rejected_logps"))):
        if extra in extras:
            fields.update({name: np.float32(record[name]) for name in names})
    return fields, None, truncated


def sft_row(record: Mapping[str, Any], *, epoch: int, record_index: int,
            encode: Callable[[str, str], Any], image_config: ImageProcessorConfig,
            response_field: str, largest_bucket: int, too_long: str, two_images: bool = False
            ) -> tuple[dict[str, np.ndarray], str | None, bool]:
    """The batch fields of one SFT record, or the reason it is dropped; and whether its response
    was truncated. ``two_images``: the prompt holds the record's ``image`` then its
    ``focus_image`` (``pixel_values`` ``[2, H, W, 3]``)."""
    del epoch  # SFT rows have no per-example randomness
    if two_images:
        encode = functools.partial(encode, num_images=2)
    fields, reason, truncated = encode_texts(encode, record["prompt"],
                                             {"": record[response_field]}, largest_bucket,
                                             too_long)
    if reason is None:
        pixel_values = image_config(record["image"])
        fields["pixel_values"] = (np.stack([pixel_values, image_config(record["focus_image"])])
                                  if two_images else pixel_values)
        fields["example_index"] = np.int32(record_index)
    return fields, reason, truncated


def filler_row(row_fn: Callable[..., tuple[dict[str, np.ndarray], str | None, bool]],
               image_config: ImageProcessorConfig, max_length: int) -> dict[str, np.ndarray]:
    """A padding row: an empty prompt and response through the same path, loss masks zeroed.

    It carries the template's image placeholders, so the model sees one well-formed sequence per
    image in every row, and no row is fully masked.
    """
    blank = np.zeros((image_config.crop_size, image_config.crop_size, 3), np.uint8)
    text_fields = ("prompt", "chosen", "rejected", "robust_chosen", "robust_rejected", "response",
                   "focus_aug_prompt")
    record = {name: "" for name in text_fields}
    record.update(image=blank, focus_image=blank, focus_aug_image=blank, focus_deg_image=blank,
                  ddw_clip_crop=0.0, ddw_clip_full=0.0, ref_chosen_logps=0.0, ref_rejected_logps=0.0,
                  noise_key=noise_key(0, -1, 600))
    fields, reason, _ = row_fn(record, epoch=0, record_index=-1)
    if reason is not None:
        raise ValueError(
            f"the template cannot encode even an empty example ({reason}) in max_length={max_length} "
            f"tokens: raise data.max_length and the largest of data.buckets to hold the prompt "
            f"template and its image tokens (twice the image's placeholders for a two-image prompt, "
            f"pairs.combine_mode='two_images')")
    return {name: (np.zeros_like(value) if name.endswith("loss_mask") else value)
            for name, value in fields.items()}
