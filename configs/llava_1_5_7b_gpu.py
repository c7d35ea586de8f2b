"""LLaVA-1.5-7B on 80 GB GPUs, for any method: ``--config=<this>:catpo`` (one GPU) or
``<this>:catpo,<gpus>`` (FSDP over that many GPUs, one host or several).

The method block and the paper's reference settings come from ``configs/<method>.py``
(`base.llava_1_5_7b`: bf16 compute over f32 parameters, remat, LoRA, RLHF-V, 2048-token buckets).
Mesh: FSDP over every GPU; the batch of 32 is split into accumulated micro-batches of 2 rows per
GPU:

    gpus            micro-batches
    1               16 of 2         <- the default, ``:catpo``
    2, 4, 8, 16     8, 4, 2, 1 of 4, 8, 16, 32      ``:catpo,<gpus>``

[our choice] 2 rows per GPU per micro-batch: what one 80 GB GPU holds beside the 7B state at
2048-token buckets with remat (``scripts/plan_memory.py``). A count that does not match the job's
devices is caught before anything is compiled, naming the valid ``optimizer.grad_accum_steps``.

Placeholders to set before running: see `base.llava_1_5_7b`.
"""

import pathlib

from mmpo_jax.config.loading import config_module

base = config_module(pathlib.Path(__file__).with_name("base.py"))


def get_config(arg: str | None = None):
    """``arg``: ``"<method>"`` or ``"<method>,<gpus>"``: a ``configs/<method>.py`` (default
    "catpo") and the job's GPU count (default 1)."""
    method, gpus = base.method_and_devices(arg, default_devices=1)
    config = base.llava_1_5_7b(base.method_file_config(method), mesh=dict(data=1, fsdp=-1, tensor=1))
    config.optimizer.grad_accum_steps = base.accumulation_steps(
        gpus, batch_size=config.data.batch_size, rows_per_device=2, min_rows=2)
    return config
