"""LLaVA-1.5 on RLHF-V as a researcher runs it, in miniature, through the command lines.

A tiny random llava-hf checkpoint (transformers' `LlavaForConditionalGeneration`, a Llama BPE
tokenizer and a `LlavaProcessor` saved with `save_pretrained`, the processor centre-cropping as
llava-hf's does) is imported with `convert import --image_aspect_ratio pad`; both LLaVA presets
train it for 2 steps on RLHF-V-format parquet, overridden only for size and paths: the GPU preset
through `python -m mmpo_jax.train` in a one-device process (as on one GPU), the TPU preset in
this process over its 8 devices (FSDP over all of them, as on a v5e-8). The GPU run's
`benchmarks` section evaluates CHAIR (COCO instances), POPE and AMBER from files in their
published formats before training and after every step. `convert export` of the GPU run's checkpoint is then loaded by
transformers, whose logits and greedy tokens equal those of our policy restored from that
checkpoint; `evaluate` scores the export and the run's checkpoint alike.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
from safetensors.numpy import load_file

from mmpo_jax import convert, evaluate
from mmpo_jax.config import preflight
from mmpo_jax.config.loading import load_config
from mmpo_jax.data import image_processing
from mmpo_jax.training.experiment import run_experiment
from mmpo_jax.training.logging import read_metrics
from mmpo_jax.training.run_model import load_run_model
from tests.data import fixtures as data_fx
from tests.engine.test_hf_export import assert_transformers_reproduces
from tests.evaluation import real_fixtures
from tests.models import hf_fixtures

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_RECORDS = 20
# size: the tiny model's sequences, batches a few records, 2 steps; short decodes, one length cap for
# captions and answers (one decode compilation per model)
SIZE = {"gpu": ("data.batch_size=16",), "tpu": ("data.batch_size=32",)}
COMMON = ("data.buckets=(128,)", "data.num_epochs=2", "train.num_steps=2",
          "train.progress_bar=false", "checkpoint.async_save=false")


def _paths(tmp_path: pathlib.Path, preset: str) -> tuple[str, ...]:
    return (f"model.checkpoint={tmp_path / 'orbax'}", f"data.manual_dir={tmp_path / 'rlhf_v'}",
            f"data.data_dir={tmp_path / 'data'}", f"workdir={tmp_path / preset}")


def _benchmarks(files: dict[str, pathlib.Path]) -> tuple[str, ...]:
    return (f"benchmarks.coco_instances={files['instances']}",
            f"benchmarks.coco_images={files['images']}",
            f"benchmarks.pope_questions=({', '.join(repr(str(p)) for p in files['pope'])},)",
            f"benchmarks.pope_images={files['images']}", f"benchmarks.amber_dir={files['amber']}",
            f"benchmarks.amber_images={files['amber_images']}",
            "benchmarks.caption_max_new_tokens=3", "benchmarks.answer_max_new_tokens=3",
            "benchmarks.every=1")


def _train_cli_on_one_device(tmp_path: pathlib.Path, flags: tuple[str, ...]) -> None:
    """`python -m mmpo_jax.train` as a user runs it on a one-GPU machine (one CPU device here)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), HOME=str(tmp_path))
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
    result = subprocess.run(
        [sys.executable, "-m", "mmpo_jax.train", f"--config={REPO / 'configs/llava_1_5_7b_gpu.py'}:dpo",
         *(f"--config.{flag}" for flag in flags)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_llava_1_5_on_rlhf_v_from_import_to_export(tmp_path):
    hf_fixtures.save_tiny_llava_hf(tmp_path / "llava-hf")  # crops, as llava-hf's processor does
    convert.main(["import", str(tmp_path / "llava-hf"), str(tmp_path / "orbax"), "--image_aspect_ratio", "pad"])
    preprocessing = image_processing.from_pretrained_dir(tmp_path / "orbax")
    assert preprocessing.pad_to_square and preprocessing.crop_size == 30  # one definition, padded
    data_fx.write_rlhf_v(str(tmp_path / "rlhf_v"), [data_fx.rlhf_v_row(p) for p in data_fx.make_pairs(NUM_RECORDS)])
    coco = real_fixtures.write_coco(tmp_path / "coco")
    amber = real_fixtures.write_amber(tmp_path / "amber")
    files = {"instances": coco["instances"], "images": coco["images"], "amber": amber["data"],
             "amber_images": amber["images"], "pope": real_fixtures.write_pope(tmp_path / "pope", coco["images"])}

    # one GPU: the shipped command line, only sizes and paths set, evaluating the real-data
    # benchmarks before training and after every step
    _train_cli_on_one_device(tmp_path, SIZE["gpu"] + COMMON + _paths(tmp_path, "gpu") + _benchmarks(files))
    gpu_run = tmp_path / "gpu"
    rows = json.loads((gpu_run / "results.json").read_text())["rows"]
    assert list(rows) == ["initial", "dpo"]
    for row in rows.values():
        assert {"chair_s", "chair_i", "recall", "pope_f1", "pope_random_accuracy", "amber_chair",
                "amber_cover", "amber_hal", "amber_cog", "amber_f1"} <= set(row)
        assert row["chair_images"] == len(real_fixtures.COCO_IMAGES) and row["num_samples"] == 1
    summary = json.loads((gpu_run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["metrics"]["benchmarks/pope_f1"]["last"] == rows["dpo"]["pope_f1"]
    evaluated = [r["step"] for r in read_metrics(gpu_run) if "benchmarks/amber_cog" in r]
    assert evaluated == [1, 2]  # every step (benchmarks.every=1), the last one the final row
    assert [r["step"] for r in read_metrics(gpu_run) if "loss/total" in r] == [1, 2]

    # a TPU slice: 8 devices, FSDP over all of them
    config = load_config(f"{REPO / 'configs/llava_1_5_7b_tpu.py'}:dpo",
                         SIZE["tpu"] + COMMON + _paths(tmp_path, "tpu"))
    preflight.check(config, device_count=jax.device_count())
    run_experiment(config)
    assert json.loads((tmp_path / "tpu" / "summary.json").read_text())["steps"] == 2

    # export the GPU run's last checkpoint; transformers reproduces our policy from it
    export = tmp_path / "export"
    convert.main(["export", str(gpu_run), str(export)])
    run = load_run_model(gpu_run / "checkpoints" / "2")
    assert run.image_config == preprocessing and run.step == 2
    trained, imported = load_file(export / "model.safetensors"), load_file(tmp_path / "llava-hf" / "model.safetensors")
    adapted = "language_model.model.layers.0.self_attn.q_proj.weight"  # a LoRA target: merged in
    assert not np.array_equal(trained[adapted], imported[adapted])
    assert_transformers_reproduces(run.model, run.tokenizer, run.image_config, export)

    # the evaluate command line reads the export with the same preprocessing
    metrics = evaluate.main(["--checkpoint", str(export), "--pope_questions", *map(str, files["pope"]),
                             "--pope_images", str(files["images"]), "--answer_max_new_tokens", "2"])
    assert 0.0 <= metrics["pope_accuracy"] <= 1.0
    from_run = evaluate.main(["--checkpoint", str(gpu_run / "checkpoints" / "2"), "--pope_questions",
                              *map(str, files["pope"]), "--pope_images", str(files["images"]),
                              "--answer_max_new_tokens", "2"])
    assert from_run == metrics  # the run's checkpoint evaluates as its export
