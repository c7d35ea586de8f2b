"""Per-device memory of a preset's real train step, compiled ahead of time on fake devices.

    python scripts/plan_memory.py --config=configs/llava_1_5_7b_tpu.py:catpo,{devices} \
        --devices=4,8,16,32
    python scripts/plan_memory.py --config=configs/llava_1_5_7b_gpu.py:catpo --devices=1

``{devices}`` in ``--config`` stands for each device count (the TPU preset takes its slice's
chip count after the method); a config that is invalid at a count (e.g. a micro-batch the
data-parallel devices do not divide) stops the script with the config checks' message, exit 2.

For each device count ``N`` the script starts itself once with ``N`` fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set before jax is imported), builds
the preset's policy, optimizer state and a batch as abstract arrays (``nnx.eval_shape`` and
``jax.ShapeDtypeStruct``s carrying the run's shardings: nothing 7B is materialised), lowers and
compiles ``engine.step.make_train_step`` exactly as ``training.loop.train`` configures it, and
reads XLA's ``compiled.memory_analysis()``. Per device:

- arguments: trainable parameters + optimizer state + frozen parameters + reference + batch (the
  state split is counted from the shardings, so it is exact, not XLA's figure);
- output: what the step returns (the donated trainable + optimizer state alias their inputs);
- temp: activations, gradients and every other temporary XLA keeps live at its peak;
- code: the generated code.

``peak ~ arguments + output - aliased + temp`` is the figure compared with a chip's HBM.

**[our choice]** the batch is the worst case: ``data.batch_size`` rows at the largest bucket
``max(data.buckets)`` (the step sees ``batch_size / grad_accum_steps`` rows at a time); the
reference mode and mesh are the config's. The compilation is XLA:CPU's, so temporaries follow the
CPU compiler's fusion and scheduling decisions: on TPU/GPU they differ (bf16 stays bf16, other
fusions, other rematerialisation), so the figures are estimates; parameters, optimizer state and
batch are exact.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

import numpy as np

from mmpo_jax.config.loading import USAGE_ERROR_STATUS, exit_on_config_error

GIB = 1024**3
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
"""LLVM's optimisation of the generated CPU code off: minutes less per 7B compilation. Buffer
assignment (argument, output, temp) happens before, on the HLO; only ``code`` grows."""
CHIPS = {"v5e (16 GB)": 16e9, "v4 (32 GB)": 32e9, "A100/H100 (80 GB)": 80e9}


def plan(config_spec: str, overrides: tuple[str, ...] = (), devices: int | None = None,
         compile_step: bool = True) -> dict[str, Any]:
    """Compiles the train step of ``config_spec`` (``path[:arg]``) on the first ``devices``
    visible devices (None: all) and returns its per-device bytes (see the module doc); without
    ``compile_step`` only the exact state and batch split (XLA's figures are None). Imports jax:
    set ``XLA_FLAGS`` first."""
    import jax
    import optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from mmpo_jax.config import checks as config_checks
    from mmpo_jax.config.loading import load_config
    from mmpo_jax.data import shapes_world
    from mmpo_jax.data.batch import Batch, SftBatch, token_field
    from mmpo_jax.data.fields import IMAGE_KINDS
    from mmpo_jax.data.image_processing import ImageProcessorConfig
    from mmpo_jax.data.tokenizer import build_word_tokenizer
    from mmpo_jax.engine import optimizer as optimizer_lib
    from mmpo_jax.engine import reference as reference_lib
    from mmpo_jax.engine import sharding
    from mmpo_jax.engine import state as state_lib
    from mmpo_jax.engine.checkpointing import abstract_target
    from mmpo_jax.engine.scoring import plan_scoring
    from mmpo_jax.engine.step import make_train_step
    from mmpo_jax.models.llava import Llava
    from mmpo_jax.training import experiment
    from mmpo_jax.training.loop import is_sft

    devices = jax.device_count() if devices is None else devices
    config_spec = config_for(config_spec, devices)
    config = load_config(config_spec, overrides)
    config_checks.validate(config, device_count=devices)
    tokenizer = (build_word_tokenizer(shapes_world.vocabulary(), model_max_length=4096)
                 if config.model.preset.startswith("tiny") else None)
    llava_config = experiment.with_runtime(experiment.model_config(config, tokenizer),
                                           config.model)
    method = config.method.to_dict()
    scoring_plan = plan_scoring(method)
    mesh = sharding.make_mesh(dict(config.mesh), devices=jax.devices()[:devices])
    rules = tuple(tuple(r) for r in config.mesh_rules)

    def build():
        return state_lib.prepare_policy(Llava(llava_config, rngs=nnx.Rngs(0)), config.model,
                                        seed=int(config.seed))

    def placed(tree):
        return abstract_target(tree, sharding.state_shardings(tree, mesh, rules))

    split = state_lib.split_policy(nnx.eval_shape(build), config.model)
    trainable, frozen = placed(split.trainable), placed(split.frozen)
    mode = config.reference.mode if scoring_plan.reference_rows else "none"
    ref_graphdef, ref_state = None, None
    if mode in ("copy", "cache"):  # a cache is built by the copy; the step then reads arrays
        ref_graphdef, ref_state = nnx.split(nnx.eval_shape(
            lambda: reference_lib.merged_copy(build())))
        ref_state = placed(ref_state)
    if mode == "cache":
        ref_graphdef, ref_state = None, None
    num_steps = max(int(config.train.num_steps), 1)
    tx = optimizer_lib.make_optimizer(config.optimizer, num_steps)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_shardings = optimizer_lib.opt_state_shardings(tx, trainable, mesh)  # as the loop's
    opt_state = abstract_target(jax.eval_shape(tx.init, trainable), opt_shardings)

    rows, length = int(config.data.batch_size), max(int(b) for b in config.data.buckets)
    size = llava_config.vision_config.image_size

    def array(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype,
                                    sharding=sharding.batch_sharding(mesh, len(shape), rules))

    tokens = {s: array((rows, length), jax.numpy.int32)
              for s in ("input_ids", "loss_mask", "attention_mask")}
    fields = {"pixel_values": array((rows, size, size, 3), jax.numpy.float32),
              "example_mask": array((rows,), jax.numpy.int32),
              "example_index": array((rows,), jax.numpy.int32)}
    if is_sft(method):
        batch = SftBatch(**fields, **tokens)
    else:
        groups = {"chosen", "rejected", *scoring_plan.token_groups}
        fields.update({token_field(g, s): v for g in groups for s, v in tokens.items()})
        fields.update({IMAGE_KINDS[k].field: fields["pixel_values"] for k in scoring_plan.images
                       if IMAGE_KINDS[k].field is not None})
        fields.update({name: array((rows,), jax.numpy.float32)
                       for name in scoring_plan.example_values})
        batch = Batch(**fields)
    cached = {}
    if mode == "cache":
        cached = {s.key: array((rows, length), jax.numpy.float32)
                  for s in scoring_plan.reference_outputs}

    def shardings_of(tree):
        return jax.tree.map(lambda x: x.sharding, tree)

    has_dropout = bool(config.model.lora.enabled and config.model.lora.dropout > 0)
    step = make_train_step(
        graphdef=split.graphdef, plan=scoring_plan, method_config=method, tx=tx,
        reference_mode=mode if mode != "none" else "cache", reference_graphdef=ref_graphdef,
        image_config=ImageProcessorConfig(size=size, crop_size=size),
        eos_token_id=int(llava_config.eos_token_id or 0),
        vision_frozen=bool(config.model.freeze_vision),
        accum_steps=int(config.optimizer.grad_accum_steps), has_dropout=has_dropout,
        in_shardings=(shardings_of(trainable), shardings_of(opt_state), shardings_of(frozen),
                      shardings_of(ref_state), shardings_of(batch), shardings_of(cached),
                      replicated),
        out_shardings=(shardings_of(trainable), shardings_of(opt_state), replicated))
    def per_device(tree):
        return sum(_nbytes(leaf.sharding.shard_shape(leaf.shape), leaf.dtype)
                   for leaf in jax.tree.leaves(tree))

    row = {
        "config": config_spec, "devices": devices, "mesh": dict(mesh.shape),
        "rows": rows, "micro_rows": rows // int(config.optimizer.grad_accum_steps),
        "length": length, "reference": mode,
        "trainable": per_device(trainable), "optimizer": per_device(opt_state),
        "frozen": per_device(frozen), "reference_params": per_device(ref_state),
        "batch": per_device((batch, cached)),
    }
    print(f"state split (before compiling): {json.dumps(row)}", file=sys.stderr, flush=True)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)
    memory = None
    if compile_step:
        compiled = step.lower(trainable, opt_state, frozen, ref_state, batch, cached, key).compile()
        memory = compiled.memory_analysis()
    return {
        **row,
        **{name: None if memory is None else int(getattr(memory, f"{name}_size_in_bytes"))
           for name in ("argument", "output", "alias", "temp")},
        "code": None if memory is None else int(memory.generated_code_size_in_bytes),
    }


def config_for(config_spec: str, devices: int) -> str:
    """``config_spec`` with ``{devices}`` replaced by the device count."""
    return config_spec.replace("{devices}", str(devices))


def _nbytes(shape, dtype) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    # numpy dtypes and PRNG key dtypes (dropout streams: their key data's bytes) alike
    return count * (dtype.itemsize if hasattr(dtype, "itemsize") else np.dtype(dtype).itemsize)


def peak(row: dict[str, Any]) -> int:
    """Bytes live at the step's peak on one device: inputs, the outputs that do not alias them,
    temporaries and code; without XLA's figures, the state and batch alone (a lower bound)."""
    if row["argument"] is None:
        return sum(row[k] for k in ("trainable", "optimizer", "frozen", "reference_params",
                                    "batch"))
    return row["argument"] + row["output"] - row["alias"] + row["temp"] + row["code"]


def _child(config_spec: str, devices: int, overrides: tuple[str, ...], timeout: float,
           state_only: bool) -> dict[str, Any]:
    """``plan`` in a fresh process with ``devices`` fake CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE} "
                         f"--xla_force_host_platform_device_count={devices}".strip())
    command = [sys.executable, __file__, f"--config={config_spec}", f"--devices={devices}",
               "--child", *(f"--override={o}" for o in overrides),
               *(["--state-only"] if state_only else [])]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode == USAGE_ERROR_STATUS:  # the config's checks: their message only
        print(f"{devices} devices: {result.stderr.strip()}", file=sys.stderr, flush=True)
        raise SystemExit(USAGE_ERROR_STATUS)
    if result.returncode:
        raise RuntimeError(f"{devices} devices failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("devices", "mesh", "rows/step", "trainable", "opt state", "frozen", "ref", "batch",
            "argument", "output", "temp", "code", "peak", "fits")
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for row in rows:
        fits = [chip for chip, size in CHIPS.items() if peak(row) <= size] or ["none listed"]
        mesh = "x".join(f"{k}{v}" for k, v in row["mesh"].items() if v > 1) or "1"
        gib = ["-" if row[k] is None else f"{row[k] / GIB:.2f}"
               for k in ("trainable", "optimizer", "frozen", "reference_params", "batch",
                         "argument", "output", "temp", "code")]
        bound = ">= " if row["argument"] is None else ""  # state only: activations not counted
        lines.append(" | ".join([str(row["devices"]), mesh,
                                 f"{row['micro_rows']}x{row['length']}", *gib,
                                 f"{bound}{peak(row) / GIB:.2f}",
                                 ("at most: " if bound else "") + ", ".join(fits)]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/<file>.py[:arg]")
    parser.add_argument("--devices", default="4,8,16,32", help="comma-separated device counts")
    parser.add_argument("--override", action="append", default=[],
                        help="a config override key=value (repeatable)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per device count")
    parser.add_argument("--state-only", action="store_true",
                        help="skip the compilation: the exact state and batch split only (seconds)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides = tuple(args.override)
    if args.child:
        with exit_on_config_error():
            row = plan(args.config, overrides, compile_step=not args.state_only)
        print(json.dumps(row))
        return
    rows = []
    for devices in (int(d) for d in args.devices.split(",")):
        row = _child(args.config, devices, overrides, args.timeout, args.state_only)
        rows.append(row)
        print(f"{devices} devices: peak {peak(row) / GIB:.2f} GiB per device "
              f"({json.dumps(row)})", flush=True)
    print(f"\n{args.config}: GiB per device, compiled by XLA:CPU on fake devices "
          f"(an estimate for TPU/GPU; see the module doc); batch {rows[0]['rows']} rows x "
          f"{rows[0]['length']} tokens, reference {rows[0]['reference']}")
    print(_table(rows))


if __name__ == "__main__":
    main()
