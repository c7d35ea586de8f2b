"""SFT on the chosen responses alone: the "control" row of every evaluation table, stand-alone.

Trains the SFT base further on the *chosen* captions of the preference split with the NLL term
(per-token mean), no reference model involved. In the shapes-world prototype this control cut
hallucination about as much as DPO, so no preference result is read without it.

Tiny run: 200 steps of 32 at lr 5e-5 from the cached SFT base (1300 steps of 32 at lr 1e-3).
Reference settings ([our choice], no paper): mDPO's LoRA setting, so the control row of a LLaVA run
matches its DPO rows — lr 1e-5, 3 epochs, batch 32, cosine, warmup 0.1, wd 0.05, b2 0.98,
LoRA r64 a128 dropout 0.05.
"""

import pathlib

from mmpo_jax.config.loading import config_module

base = config_module(pathlib.Path(__file__).with_name("base.py"))

REFERENCE_SETTINGS = dict(
    config_module(pathlib.Path(__file__).with_name("mdpo.py")).REFERENCE_SETTINGS,
    source="[our choice] mDPO's setting (seed 003), so the control matches the DPO rows",
)


def get_config(arg: str | None = None):
    """The tiny shapes-world run (``arg`` unused)."""
    return base.experiment(
        "sft",
        base.method("sft"),
        optimizer=dict(learning_rate=5e-5),
        train=dict(num_steps=200),
        eval=dict(control=False),  # this run is the control
        reference_settings=REFERENCE_SETTINGS,
    )
