"""ADAPT's Visual Attention Guidance DPO (seed 001, METHODS.md section 4): the chosen response
scored on the visually-enhanced image ``I_VE`` (reference anchor mask), the rejected one on the
noised image, for policy and reference.

Anchor: the first K=5 generated tokens' attention (``anchor_steps``); refined mask thresholded at
its 40th percentile (``mask_threshold_percentile``, 0 -> METHODS.md's soft chain).
Tiny run: 200 steps of 32 at lr 1e-5.
Measured on the shapes world (``python scripts/adapt_anchor.py``, 512 preference images): the
tiny model's anchor on its 4x4 patch grid barely finds the objects; ``I_VE`` keeps 49% of an
object's box on average against 39% of the whole image, and whitens 46% of the objects mostly, so
VAG-DPO often scores the chosen caption on an image that no longer shows what it names (sampled
CHAIR_i .213 after training vs .201 before).
On v2 (``configs/shapes_world_v2.py:adapt``, 8x8 grid, the default base; 3:45 wall with the world
and the base cached, 2026-12-07) the anchor is not the limit (that base's own anchor keeps 88.5 %
of the objects of 512 preference images and whitens 84 % of the background, an oracle anchor 96 %
and 88 %: ``scripts/adapt_anchor.py``), yet greedy CHAIR_i rises .183 -> .208 and sampled
stays .297 -> .294 +- .011 (recall .600 -> .586); ADAPT's decoding on the base, .191, is worse
than greedy's .183. The preference is won on the rejected side alone: from step 100 reward
accuracy 1.0, and at step 200 the chosen reward is +.04, the rejected -3.68. VAG-DPO scores
``y_l`` on ``I_noise``, so lowering any caption's likelihood on noise separates the pair, and a
clean test image never shows noise.
Reference settings ([our choice]): the seed gives no training hyper-parameters; mDPO's setting.
"""

import pathlib

from mmpo_jax.config.loading import config_module

base = config_module(pathlib.Path(__file__).with_name("base.py"))

REFERENCE_SETTINGS = dict(
    config_module(pathlib.Path(__file__).with_name("mdpo.py")).REFERENCE_SETTINGS,
    source="[our choice] ADAPT gives no training setting; mDPO's (seed 003)",
)


def get_config(arg: str | None = None):
    """The tiny shapes-world run (``arg`` unused)."""
    return base.experiment(
        "adapt",
        base.method("adapt", anchor_steps=5, mask_threshold_percentile=0.4),
        optimizer=dict(learning_rate=1e-5),
        train=dict(num_steps=200),
        reference_settings=REFERENCE_SETTINGS,
    )
