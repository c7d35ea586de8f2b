"""Any method's tiny run on the shapes world v2: ``--config=<this>:catpo``.

The method's own tiny config (``configs/<method>.py``) with the v2 world (128-px images, 2-5
objects, three hallucination sources: `mmpo_jax.data.shapes_world_v2`), the ``tiny_v2`` preset
(64 visual tokens) and buckets that hold every v2 sequence.

Buckets [measured, not chosen]: with 64 image tokens a v2 sequence is 78-106 tokens (SFT captions:
median 86, 99th percentile 102, longest 106; preference captions at most 98), so v1's
``(64, 96)`` truncated 7.5 % of the SFT captions and 2 % of the rejected preference captions, and
its 64 bucket was never used. ``(96, 112)`` keeps every one whole
(`tests/config/test_configs.py` checks the longest caption the grammar can write).

SFT base [measured]: the vision tower alone first for 800 steps on per-cell shape and colour
labels, then frozen through 400 SFT steps (`mmpo_jax.training.vision_pretrain`): greedy CHAIR_i
.165, recall .635 (``scripts/shapes_world_sft.py``), where 1300 SFT steps alone never learned
shapes (CHAIR_i .469, recall .475). The tower's batches stay the SFT's 32: with
``sft_base.vision_batch_size=16`` the tower costs about 0.6 of its time (800 steps of 32 were the
main job's largest phase, 376 s of a 19:42 run at 70 % CPU) for held-out per-cell shape accuracy
.83 (.87 with 32) and the same greedy captions (CHAIR_i .170, recall .630), but sampled and
attribute hallucination rose (sampled CHAIR_i .333 against .297, greedy CHAIR_i attr .303 against
.245) and Cat-PO no longer beat the base (greedy CHAIR_i .180 against .170).
POPE and the question prompts stay at chance with and without the tower's pretraining.

Why the questions stay at chance [measured, ``scripts/shapes_world_sft.py``'s
``answer_dependence``]: the language model never reads the asked shape. The answer distribution
is the same whichever shape a question names (mean L1 distance between shapes .0005 for presence,
.002 for colour, on 60 validation images); presence's answer NLL is ln 2 (.698) and count's the
prior's (.71) on the SFT records themselves, with the own image or another; colour answers are
read from the image (NLL 1.05 own / 2.67 another) but put the same probability on the asked
shape's colour as on any other object's (.345 / .334, absent colours .03). Captions never need
retrieval keyed by a shape (the grammar writes the colour first), and four changes left it
unlearned: half the SFT records questions (``question_fraction=0.5``), 300 further steps on
question records alone, a 3-layer language model, and a tower head read out by the shape and
colour words' embeddings (LLaVA-style alignment of the visual tokens).
It is not the plateau's length alone, nor only the prompt's place [measured from the saved tower,
``scripts/shapes_world_sft.py --vision-from``; greedy, eval splits]: 1200 SFT steps write better
captions (recall .811, CHAIR_i .181) but presence's NLL stays ln 2 (.697 own image / .696 another)
and POPE .539 comes from a yes-ratio of .70; the prompt before the image (``--prompt-first``)
changes nothing at 400 steps and gives a first trace at 1200 (NLL .676 / .686, presence .588,
POPE .507); with ``question_fraction=0.5`` too, 1200 steps reach presence .675 (NLL .627 / .663)
but POPE only .532, colour .484 and greedy CHAIR_i .202. Probes at the position that predicts the
answer (``answer_position_probe``): after 400 steps the asked shape is not there after the first
layer (.16, chance .17); after 1200 it is (.60) but yes / no is never decodable (<= .59): the
second hop, a look-up of the image tokens keyed by the shape, does not form in 2 layers (captions
never need it: objects are named left to right, so a spatial scan writes them). With the prompt
first the shape reaches that position only at the last layer's output (.90-1.0), too late.
"""

import pathlib

from mmpo_jax.config.loading import config_module
from mmpo_jax.data.shapes_world_v2 import FOCUS_PROMPT

base = config_module(pathlib.Path(__file__).with_name("base.py"))

V2_SECTIONS = dict(
    data=dict(builder={"world": "v2"}, buckets=(96, 112)),
    model=dict(preset="tiny_v2"),
    sft_base=dict(vision_steps=800, freeze_vision=True, num_steps=400, buckets=(96, 112)),
)
"""What the v2 world changes in a tiny shapes-world config."""

# --- per-method v2 settings (P2-DPO's owner edits this block) ---------------------------------
METHOD_SECTIONS = dict(
    p2dpo=dict(
        data=dict(builder={}, manual_dir="~/mmpo_data/generated/p2dpo_pairs_v2", buckets=(96, 112, 192)),
        pairs=dict(source_builder={"world": "v2"}, combine_mode="two_images",
                   enhanced_prompt=FOCUS_PROMPT),
        method=dict(combine_mode="two_images"),
    ),
)
"""Applied after ``V2_SECTIONS`` for the method named. P2-DPO trains on its generated pairs (the
``p2dpo_pairs`` dataset takes no builder options; its own folder, so v1 pairs are never reused);
the v2 world is the source of its prompts (``pairs.source_builder``). On v2 ``I_aug`` is the
paper's: a prompt with the image, then the crop, and the instruction to answer mainly from the
first image (``combine_mode="two_images"``; ``stitch`` squeezes nothing any more but its chosen
captions name the crop's objects twice and carry more hallucinations per caption than the
rejected ones, measured in ``configs/p2dpo.py``). Its two-image prompts (128 image tokens) need
the 192 bucket; the SFT base keeps its own buckets (``sft_base.buckets``), so every v2 method
shares one cached base."""


def get_config(arg: str | None = None):
    """``arg``: the method (a ``configs/<method>.py``), default "catpo"."""
    method = arg or "catpo"
    config = base.method_file_config(method)
    base.override(config, V2_SECTIONS)
    base.override(config, METHOD_SECTIONS.get(method, {}))
    return config
