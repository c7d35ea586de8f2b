"""P2-DPO (seed 002, METHODS.md section 5): DPO on focus-enhanced pairs + 0.3 x the calibration
term, plus DPO on visual-robustness pairs scored on the noised image; static weights 0.5/0.5
(``ddw=True``: CLIPScore dynamic weights).

Data: the split "p2dpo_pairs" — records with ``chosen``/``rejected`` (the focus pair),
``robust_chosen``/``robust_rejected``, ``focus_aug_image``/``focus_deg_image`` (and
``ddw_clip_crop``/``ddw_clip_full`` for ddw) — is generated on-policy from the SFT base by the
pair-generation pipeline of the on-policy issue; shapes world's "preference" split lacks them.
Tiny run: 200 steps of 32 at lr 1e-5.
Reference settings (paper): LoRA r = alpha in 32..128, lr 1e-5..2e-5, 1-4 epochs, beta 0.1; the
point recorded here (r = alpha = 64, lr 1e-5, 2 epochs) is [our choice] within those ranges.
"""

import pathlib

from mmpo_jax.training.config_loading import config_module

base = config_module(pathlib.Path(__file__).with_name("base.py"))

REFERENCE_SETTINGS = dict(
    source="P2-DPO paper (seed 002): r = alpha in 32..128, lr 1e-5..2e-5, 1-4 epochs",
    learning_rate=1e-5, num_epochs=2, lora_rank=64, lora_alpha=64.0,
)


def get_config(arg: str | None = None):
    """The tiny shapes-world run (``arg`` unused)."""
    return base.experiment(
        "p2dpo",
        base.method("p2dpo", lambda_calib=0.3, calib_ref_response="chosen", w_base=0.5,
                    ddw=False),
        data=dict(split="p2dpo_pairs"),
        optimizer=dict(learning_rate=1e-5),
        train=dict(num_steps=200),
        reference_settings=REFERENCE_SETTINGS,
    )
