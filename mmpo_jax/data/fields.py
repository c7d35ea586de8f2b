"""What each kind of image, token group and per-example value of a ``Batch`` is, and its origin.

The objectives name what they score in this vocabulary (a response is a token group read on an
image kind, ``objectives.terms.Response``); the engine and the config checks derive from these
tables which ``Batch`` fields a method reads, which ``preference_pipeline`` extras fill them and
which record fields of the training split those need. A new kind of image is one entry here plus
the code that makes it (``data.pipeline`` for a field of the batch, ``engine.scoring`` for an image
the step derives).
"""

from __future__ import annotations

import dataclasses

ROLLOUTS = "rollouts"
"""The source of on-policy methods' responses: samples of the policy, not records of a dataset."""


@dataclasses.dataclass(frozen=True)
class ImageKind:
    """One kind of image a response can be scored on.

    Attributes:
      field: the ``Batch`` field holding it (float32 ``[B, H, W, 3]``, normalised, or
        ``[B, K, H, W, 3]`` for K images per example, read by prompts with K images); None for
        an image the training step makes itself.
      extra: the ``preference_pipeline`` extra that fills ``field`` (None: always present).
      record_fields: the record fields it is made from.
      per_epoch: drawn anew per (seed, epoch, record): a reference cache built over one epoch
        cannot hold what is scored on it.
      doc: what it is.
    """

    field: str | None
    extra: str | None
    record_fields: tuple[str, ...]
    per_epoch: bool
    doc: str


ORIGINAL, CORRUPTED, NOISED, PAIR_NOISED, AUGMENTED, FOCUS_PAIR, DEGRADED, ENHANCED = (
    "original", "corrupted", "noised", "pair_noised", "augmented", "focus_pair", "degraded",
    "enhanced")

IMAGE_KINDS: dict[str, ImageKind] = {
    ORIGINAL: ImageKind("pixel_values", None, ("image",), False, "the record's image"),
    CORRUPTED: ImageKind("corrupt_pixel_values", "corrupt_pixel_values", ("image",), True,
                         "mDPO's random-resized crop I' of the image"),
    NOISED: ImageKind("noise_pixel_values", "noise_pixel_values", ("image",), True,
                      "the diffusion-noised image I_noise of ADAPT and TPO, drawn per epoch"),
    PAIR_NOISED: ImageKind("robust_noise_pixel_values", "robust_pair", ("image", "noise_key"), False,
                           "P2-DPO's I_noise of the robustness pair: the very image its y_l was "
                           "sampled from, rebuilt from the noise key stored with the pair"),
    AUGMENTED: ImageKind("focus_aug_pixel_values", "focus_images", ("focus_aug_image",), False,
                         "P2-DPO's focus-enhanced I_aug, stored with the pair"),
    FOCUS_PAIR: ImageKind("focus_pair_pixel_values", "focus_two_images",
                          ("image", "focus_aug_image", "focus_aug_prompt"), False,
                          "P2-DPO's two-image I_aug (combine_mode 'two_images'): the image, then "
                          "the crop stored as focus_aug_image, float32 [B, 2, H, W, 3]; read with "
                          "the focus_aug_* token groups (the enhanced prompt, two images)"),
    DEGRADED: ImageKind("focus_deg_pixel_values", "focus_images", ("focus_deg_image",), False,
                        "P2-DPO's degraded I_deg, stored with the pair"),
    ENHANCED: ImageKind(None, None, ("image",), False,
                        "ADAPT's visually enhanced I_VE, made by the step from the reference's "
                        "attention on the original image"),
}
"""Image kind -> where it comes from."""


@dataclasses.dataclass(frozen=True)
class TokenGroup:
    """One group of response tokens of a batch (``{group}_input_ids`` / ``_loss_mask`` /
    ``_attention_mask``, all ``[B, T]``).

    Attributes:
      record_field: the record field holding the response text (None for rollouts).
      extra: the ``preference_pipeline`` extra that adds the group (None: always present), or
        ``ROLLOUTS`` for samples of the policy.
      preferred: True for a pair's chosen response, False for its rejected one, None otherwise
        (token weightings treat the two sides differently).
    """

    record_field: str | None
    extra: str | None
    preferred: bool | None


TOKEN_GROUPS: dict[str, TokenGroup] = {
    "chosen": TokenGroup("chosen", None, True),
    "rejected": TokenGroup("rejected", None, False),
    "robust_chosen": TokenGroup("robust_chosen", "robust_pair", True),
    "robust_rejected": TokenGroup("robust_rejected", "robust_pair", False),
    "focus_aug_chosen": TokenGroup("chosen", "focus_two_images", True),
    "focus_aug_rejected": TokenGroup("rejected", "focus_two_images", False),
    "sample": TokenGroup(None, ROLLOUTS, None),
}
"""Token group -> where its tokens come from. ``focus_aug_*``: the focus pair's replies after the
record's ``focus_aug_prompt`` with two images (P2-DPO's ``two_images`` ``I_aug``)."""

EXAMPLE_VALUES: dict[str, str] = {
    "ddw_clip_crop": "ddw_clip",
    "ddw_clip_full": "ddw_clip",
}
"""Per-example ``[B]`` batch fields a loss may read -> the pipeline extra that adds them (the
record field has the same name)."""
