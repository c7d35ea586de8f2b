"""LLaVA-1.5-7B on a v4-8 / v5e-8 TPU VM slice, for any method: ``--config=<this>:catpo``.

The method block and the paper's reference settings come from ``configs/<method>.py``
(`base.llava_1_5_7b`: bf16 compute over f32 parameters, remat, LoRA, RLHF-V, 2048-token buckets).
Mesh: FSDP over every chip (8 on v5e-8, 4 on v4-8), no tensor parallelism; the batch of 32 runs as
4 accumulated micro-batches of 8 (1-2 per chip).

Placeholders to set before running: see `base.llava_1_5_7b`.
"""

import pathlib

from mmpo_jax.config.loading import config_module

base = config_module(pathlib.Path(__file__).with_name("base.py"))


def get_config(arg: str | None = None):
    """``arg``: the method (a ``configs/<method>.py``), default "catpo"."""
    return base.llava_1_5_7b(
        base.method_file_config(arg or "catpo"),
        mesh=dict(data=1, fsdp=-1, tensor=1),
        optimizer=dict(grad_accum_steps=4),
    )
