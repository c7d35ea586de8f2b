"""mDPO (seed 003, METHODS.md section 2): DPO + CoPO (chosen under the image vs a corrupted crop)
+ AncPO (reward anchor, delta 0), each of weight 1.

The corrupted image is the pipeline's ``corrupt_pixel_values`` (random resized crop keeping 1-20%
of the area, one draw per example shared by policy and reference).
Tiny run: 200 steps of 32 at lr 1e-5 from the cached SFT base, full fine-tuning, reference = copy.
Reference settings (paper): LoRA r64 a128 dropout 0.05 on every LLM linear layer, lr 1e-5,
3 epochs, batch 32, cosine, warmup 0.1, wd 0.05, Adam b2 0.98, reference = the policy with LoRA
disabled ("lora_base"), 10k VLFeedback pairs.
"""

import pathlib

from mmpo_jax.config.loading import config_module

base = config_module(pathlib.Path(__file__).with_name("base.py"))

REFERENCE_SETTINGS = dict(
    source="mDPO paper and code (seed 003)",
    learning_rate=1e-5, num_epochs=3, batch_size=32, schedule="cosine", warmup_ratio=0.1,
    weight_decay=0.05, b2=0.98, lora_rank=64, lora_alpha=128.0, lora_dropout=0.05,
    reference_mode="lora_base", dataset="VLFeedback, 10k pairs",
)


def get_config(arg: str | None = None):
    """The tiny shapes-world run (``arg`` unused)."""
    return base.experiment(
        "mdpo",
        base.method("mdpo", terms={"dpo": 1.0, "copo": 1.0, "anchor": 1.0}),
        optimizer=dict(learning_rate=1e-5),
        train=dict(num_steps=200),
        reference_settings=REFERENCE_SETTINGS,
    )
