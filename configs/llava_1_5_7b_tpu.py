"""LLaVA-1.5-7B on a TPU slice, for any method: ``--config=<this>:catpo`` or ``<this>:catpo,<chips>``.

The method block and the paper's reference settings come from ``configs/<method>.py``
(`base.llava_1_5_7b`: bf16 compute over f32 parameters, remat, LoRA, RLHF-V, 2048-token buckets).
Mesh: FSDP over every chip, no tensor parallelism. The batch of 32 is split into accumulated
micro-batches of ``max(8, chips)`` rows, which every chip count dividing it spreads evenly:

    chips (slice)               micro-batches   rows per chip
    4 (v4-8), 8 (v5e-8)         4 of 8          2, 1            <- the default, ``:catpo``
    16 (v4-32, v5e-16)          2 of 16         1               ``:catpo,16``
    32 (v4-64, v5e-32)          1 of 32         1               ``:catpo,32``

(``jax.device_count()`` on the slice is the chip count; a v4 chip is one device.) The chip count
is part of the config argument because the config is read before the job's devices are known (a
multi-host job starts ``jax.distributed`` after reading it); a count that does not match the
slice is caught before anything is compiled, naming the valid ``optimizer.grad_accum_steps``.
[our choice] ``max(8, chips)`` keeps the step at one or two rows per chip, what a v5e chip's
16 GB holds beside the sharded 7B state (``scripts/plan_memory.py``), with as few accumulation
passes as that allows.

Placeholders to set before running: see `base.llava_1_5_7b`.
"""

import pathlib

from mmpo_jax.config.loading import config_module

base = config_module(pathlib.Path(__file__).with_name("base.py"))


def get_config(arg: str | None = None):
    """``arg``: ``"<method>"`` or ``"<method>,<chips>"``: a ``configs/<method>.py`` (default
    "catpo") and the slice's chip count (default 8, also right for 4)."""
    method, chips = base.method_and_devices(arg, default_devices=8)
    config = base.llava_1_5_7b(base.method_file_config(method), mesh=dict(data=1, fsdp=-1, tensor=1))
    config.optimizer.grad_accum_steps = base.accumulation_steps(
        chips, batch_size=config.data.batch_size, rows_per_device=1, min_rows=8)
    return config
