"""TPO-style token weights (METHODS.md section 7) on DPO: the reference's logit gap between the
image and its noised copy, ``w = sigma(Delta) + 0.5`` on chosen tokens (``1 - sigma + 0.5`` on
rejected), entering as ``sum_t (log pi + log w_t)`` for the policy.

Needs the pipeline's ``noise_pixel_values``. Tiny run: 200 steps of 32 at lr 1e-5.
Reference settings ([our choice], not a seed paper): Cat-PO's, the other token-weighted DPO.
"""

import pathlib

from mmpo_jax.config.loading import config_module

base = config_module(pathlib.Path(__file__).with_name("base.py"))

REFERENCE_SETTINGS = dict(
    config_module(pathlib.Path(__file__).with_name("catpo.py")).REFERENCE_SETTINGS,
    source="[our choice] Cat-PO's setting (seed 000), the other token-weighted DPO",
)


def get_config(arg: str | None = None):
    """The tiny shapes-world run (``arg`` unused)."""
    return base.experiment(
        "tpo",
        base.method("tpo", token_weights="tpo"),
        optimizer=dict(learning_rate=1e-5),
        train=dict(num_steps=200),
        reference_settings=REFERENCE_SETTINGS,
    )
