"""One process of the two-process CPU job that `tests/test_multiprocess.py` launches.

``python -m tests.multiprocess_worker --process_id=K --port=P --workdir=D --phase=first|resume|sft_focus``
(with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``): joins the job on localhost, loads
the initial policy the test saved in ``<workdir>/base`` (``model_io.load_model``: a whole copy on
each process, as the cached SFT base is), then

- ``first``: trains `CONFIG` but, after `BLOCK_AFTER` steps (checkpointed), writes
  ``<workdir>/blocked.K`` and waits forever for its next batch, as a process stalled mid-run;
  the test kills one process there;
- ``resume``: trains `CONFIG` to the end from the latest checkpoint, saves the final policy with
  ``model_io.save_model`` (collective) and loads it back with ``load_model`` (a whole copy on
  this process), and writes its parameters to ``<workdir>/final_params.K.npz``;
- ``sft_focus``: trains an SFT of `NUM_STEPS` whose one-image batches are interleaved with
  two-image ones (`focus_records`, as the v2 SFT base reads ``sft_focus``) and writes its
  parameters to ``<workdir>/sft_params.K.npz``.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import grain
import jax
import numpy as np
from flax import nnx

from mmpo_jax.config.loading import load_config
from mmpo_jax.engine import distributed, model_io
from mmpo_jax.engine.scoring import plan_scoring
from mmpo_jax.training.loop import make_iterator, train
from tests.engine import step_fixtures as fx

NUM_STEPS, SAVE_EVERY, BLOCK_AFTER = 4, 2, 2
HEARTBEAT_TIMEOUT = 5
CONFIG = ("train.progress_bar=false", "train.log_every=1", "data.batch_size=8",
          "data.buckets=(64,96)", "eval.enabled=false", f"train.num_steps={NUM_STEPS}",
          f"checkpoint.save_every={SAVE_EVERY}", "optimizer.learning_rate=1e-3",
          "optimizer.schedule=constant", "optimizer.warmup_ratio=0.0", "optimizer.eps=1e-3",
          "mesh.data=1", "mesh.fsdp=8")
"""Cat-PO on the tiny model, one fsdp axis over all 8 devices (both processes). Adam divides each
element's gradient by its own running scale, so an element whose gradient is ~0 would move by a
good part of the learning rate on float rounding alone (the all-reduce sums in another order
across processes); ``eps=1e-3`` keeps such elements still, so that the 1e-5 comparison measures
the multi-process machinery rather than the rounding of near-zero gradients."""


def config(*overrides: str):
    return load_config("configs/catpo.py", CONFIG + overrides)


def sft_config():
    return load_config("configs/sft.py", CONFIG)


def focus_records(count: int = 8) -> list[dict]:
    """Two-image SFT records: each preference record's image, its top-left quarter as the crop,
    the chosen caption as the response."""
    return [{**record, "response": record["chosen"], "focus_image": record["image"][:32, :32]}
            for record in fx.records(count)]


def flat_params(model) -> dict[str, np.ndarray]:
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def write_params(model, folder: pathlib.Path, npz: pathlib.Path) -> None:
    """Saves ``model`` into ``folder`` (collective), loads it back whole on this process and
    writes its parameters to ``npz``."""
    model_io.save_model(model, folder)
    loaded, _ = model_io.load_model(folder)
    np.savez(npz, **flat_params(loaded))


class StallAfter(grain.DatasetIterator):
    """``inner``'s batches, then, at batch ``count + 1``, a marker file and an endless wait."""

    def __init__(self, inner: grain.DatasetIterator, count: int, marker: pathlib.Path):
        super().__init__(inner)
        self._count, self._marker = count, marker

    def __next__(self):
        if self._count == 0:
            self._marker.write_text("")
            while True:
                time.sleep(1)
        self._count -= 1
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--process_id", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workdir", type=pathlib.Path, required=True)
    parser.add_argument("--phase", choices=("first", "resume", "sft_focus"), required=True)
    args = parser.parse_args()
    distributed.initialize(distributed.Settings(
        coordinator=f"localhost:{args.port}", num_processes=2, process_id=args.process_id,
        initialization_timeout=120, heartbeat_timeout=HEARTBEAT_TIMEOUT, shutdown_timeout=60))
    jax.config.update("jax_default_matmul_precision", "highest")  # as tests/conftest.py
    base, _ = model_io.load_model(args.workdir / "base")  # 8 s faster than building it again
    if args.phase == "sft_focus":
        result = train(sft_config(), model=base, tokenizer=fx.tokenizer(), source=list(fx.records(16)),
                       image_config=fx.IMAGE_CONFIG, workdir=args.workdir / "sft",
                       focus_source=focus_records())
        write_params(result.model, args.workdir / "sft_final",
                     args.workdir / f"sft_params.{args.process_id}.npz")
        return
    run = config()
    run_dir = args.workdir / "run"
    common = dict(model=base, tokenizer=fx.tokenizer(), source=list(fx.records(16)),
                  image_config=fx.IMAGE_CONFIG, workdir=run_dir)
    if args.phase == "first":
        iterator = make_iterator(run, common["source"], tokenizer=fx.tokenizer(),
                                 image_config=fx.IMAGE_CONFIG, num_image_tokens=16,
                                 plan=plan_scoring(run.method.to_dict()))
        train(run, data_iterator=StallAfter(iterator, BLOCK_AFTER,
                                            args.workdir / f"blocked.{args.process_id}"),
              **common)
        raise AssertionError("the stalled run returned")
    result = train(run, **common)
    write_params(result.model, args.workdir / "final",
                 args.workdir / f"final_params.{args.process_id}.npz")


if __name__ == "__main__":
    distributed.exit_together(main)()
