"""Cat-PO (seed 000, METHODS.md section 3): token-weighted DPO + weighted token KL (0.03).

Token weights come from the reference forward's own attention (head mean over the 60-70% depth
band) and embedding similarity: alpha 0.5, lambda_ref 0.5, min-max normalised, no top-k.
Ablations: ``--config.method.alpha=1`` (attention only), ``=0`` (similarity only),
``--config.method.terms.token_kl=0`` (no KL), ``--config.method.top_k_percent=20``.
Tiny run: 200 steps of 32 at lr 1e-5 from the cached SFT base.
Reference settings (paper): beta 0.1, lr 1.4e-6, 6 epochs, batch 32, cosine, warmup 0.03,
wd 0.05, grad clip 1.0, LoRA r128 a256, vision tower frozen, RLHF-V (5,733 pairs, 10% held out).
"""

import pathlib

from mmpo_jax.config.loading import config_module

base = config_module(pathlib.Path(__file__).with_name("base.py"))

REFERENCE_SETTINGS = dict(
    source="Cat-PO paper (seed 000)",
    learning_rate=1.4e-6, num_epochs=6, batch_size=32, schedule="cosine", warmup_ratio=0.03,
    weight_decay=0.05, grad_clip=1.0, lora_rank=128, lora_alpha=256.0, freeze_vision=True,
    dataset="RLHF-V, 5,733 pairs, 10% held out",
)


def get_config(arg: str | None = None):
    """The tiny shapes-world run (``arg`` unused)."""
    return base.experiment(
        "catpo",
        base.method("catpo", beta=0.1, terms={"dpo": 1.0, "token_kl": 0.03},
                    token_weights="catpo", alpha=0.5, lambda_ref=0.5, normalize="minmax",
                    top_k_percent=0.0, layer_band=(0.6, 0.7)),
        optimizer=dict(learning_rate=1e-5),
        train=dict(num_steps=200),
        reference_settings=REFERENCE_SETTINGS,
    )
