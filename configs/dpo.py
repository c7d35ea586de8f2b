"""DPO, the baseline of every seed (METHODS.md section 1): sigmoid loss, beta 0.1, summed log-probs.

Tiny run: 200 steps of 32 at lr 1e-5 from the cached SFT base. The prototype collapsed at lr 5e-5
and stayed sane at lr <= 1e-5.
Reference settings: mDPO trains its DPO baseline with its own setting — LoRA r64 a128 dropout
0.05, lr 1e-5, 3 epochs, batch 32, cosine, warmup 0.1, wd 0.05, b2 0.98.
"""

import pathlib

from mmpo_jax.config.loading import config_module

base = config_module(pathlib.Path(__file__).with_name("base.py"))

REFERENCE_SETTINGS = dict(
    config_module(pathlib.Path(__file__).with_name("mdpo.py")).REFERENCE_SETTINGS,
    source="mDPO (seed 003): its DPO baseline shares its setting",
)


def get_config(arg: str | None = None):
    """The tiny shapes-world run (``arg`` unused)."""
    return base.experiment(
        "dpo",
        base.method("dpo"),
        optimizer=dict(learning_rate=1e-5),
        train=dict(num_steps=200),
        reference_settings=REFERENCE_SETTINGS,
    )
