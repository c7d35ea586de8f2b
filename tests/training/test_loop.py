"""The training loop: resume equality (a finished run rerun keeps its summary), every method trains, and the main job end to end."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from mmpo_jax.config import checks as config_checks
from mmpo_jax.config.loading import load_config
from mmpo_jax.data import example_randomness
from mmpo_jax.training.experiment import run_experiment
from mmpo_jax.training.logging import read_metrics
from mmpo_jax.training.loop import train
from tests.engine import step_fixtures as fx

SMALL = ("train.progress_bar=false", "train.log_every=1", "data.batch_size=8",
         "data.buckets=(64,96)", "checkpoint.async_save=false", "eval.enabled=false")


def _config(method_file: str, *overrides: str):
    config = load_config(f"configs/{method_file}", SMALL + overrides)
    config_checks.validate(config, device_count=jax.device_count())
    return config


def _params(model):
    return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _train(config, workdir, source=None, **kwargs):
    return train(config, model=fx.base_model(), tokenizer=fx.tokenizer(),
                 source=list(source or fx.records(16)), image_config=fx.IMAGE_CONFIG,
                 workdir=workdir, **kwargs)


def test_resumed_run_reaches_the_uninterrupted_parameters(tmp_path):
    config = _config("dpo.py", "train.num_steps=4", "checkpoint.save_every=2",
                     "optimizer.learning_rate=1e-3", "mesh.fsdp=2")
    whole = _train(config, tmp_path / "whole")
    first = _train(config, tmp_path / "resumed", stop_at=2)
    assert first.steps == 2
    resumed = _train(config, tmp_path / "resumed")
    fx.tree_allclose(_params(whole.model), _params(resumed.model), rtol=1e-6, atol=1e-7)
    logged = [r["step"] for r in read_metrics(tmp_path / "resumed")]
    assert logged == [1, 2, 3, 4]
    written = (tmp_path / "whole" / "summary.json").read_bytes()
    assert json.loads(written)["steps"] == 4
    # rerun once finished (e.g. to export it): 0 steps trained, the trained run's summary kept
    again = _train(config, tmp_path / "whole")
    assert (tmp_path / "whole" / "summary.json").read_bytes() == written
    assert again.steps == 4 and again.summary["steps"] == 4
    assert again.summary["metrics"]["loss/total"] == whole.summary["metrics"]["loss/total"]
    fx.tree_allclose(_params(whole.model), _params(again.model), rtol=0, atol=0)


@pytest.mark.slow
def test_an_sft_with_two_image_batches_trains_and_resumes(tmp_path):
    """The SFT base's mix: one-image batches interleaved with two-image ones (image, then a crop),
    each its own shape; a resumed run continues the stream and reaches the same parameters."""
    config = _config("sft.py", "train.num_steps=4", "checkpoint.save_every=2",
                     "optimizer.learning_rate=1e-3")
    focus = [dict(r, response=r["chosen"], focus_image=r["image"][8:40, 16:48])
             for r in fx.records(8)]
    whole = _train(config, tmp_path / "whole", focus_source=focus)  # batches: one, two, one, one
    _train(config, tmp_path / "resumed", focus_source=focus, stop_at=3)
    resumed = _train(config, tmp_path / "resumed", focus_source=focus)
    fx.tree_allclose(_params(whole.model), _params(resumed.model), rtol=1e-6, atol=1e-7)
    assert all(np.isfinite(r["loss/total"]) for r in read_metrics(tmp_path / "whole"))
    with pytest.raises(ValueError, match="two-image focus records are mixed into an SFT only"):
        _train(_config("dpo.py", "train.num_steps=1"), tmp_path / "dpo", focus_source=focus)


def _p2dpo_records():
    # P2-DPO's pairs come from its generation pipeline; here each record carries given focus
    # images and a robustness pair, which is what the trainer reads.
    records = []
    for index, record in enumerate(fx.records(16)):
        records.append(dict(record, focus_aug_image=record["image"],
                            focus_deg_image=np.zeros_like(record["image"]),
                            robust_chosen=record["chosen"], robust_rejected=record["rejected"],
                            noise_key=example_randomness.noise_key(0, index, 600)))
    return records


@pytest.mark.slow
@pytest.mark.parametrize("method_file", ["sft.py", "dpo.py", "mdpo.py", "catpo.py", "tpo.py",
                                         "adapt.py", "p2dpo.py"])
def test_every_method_trains_without_nan_and_its_loss_goes_down(tmp_path, method_file):
    config = _config(method_file, "train.num_steps=12", "optimizer.learning_rate=2e-3",
                     "optimizer.warmup_ratio=0.0", "optimizer.schedule=constant")
    source = _p2dpo_records() if method_file == "p2dpo.py" else None
    _train(config, tmp_path, source=source)
    losses = [r["loss/total"] for r in read_metrics(tmp_path)]
    assert len(losses) == 12 and np.all(np.isfinite(losses)), losses
    # Two passes over 16 records: the second pass's loss is below the first's.
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses


@pytest.mark.slow
def test_main_job_prints_the_before_after_table(tmp_path, capsys):
    world = "data.builder={'sft_size': 64, 'preference_size': 32, 'test_caption_size': 8, " \
            "'test_pope_images': 2}"
    config = load_config("configs/catpo.py", (
        world, f"data.data_dir={tmp_path / 'data'}", f"workdir={tmp_path / 'run'}",
        "train.progress_bar=false", "train.num_steps=3", "data.batch_size=8",
        "sft_base.num_steps=4", "sft_base.batch_size=8", "eval.num_samples=1",
        "eval.max_new_tokens=8", "checkpoint.async_save=false"))
    config_checks.validate(config, device_count=jax.device_count())
    rows = run_experiment(config)
    assert list(rows) == ["base (SFT)", "catpo", "control (SFT on chosen)"]
    for metrics in rows.values():
        assert {"chair_i", "sampled/chair_i", "pope_f1", "continuation_prob"} <= set(metrics)
    out = capsys.readouterr().out
    assert "CHAIR_i sampled" in out and "control (SFT on chosen)" in out
    assert (tmp_path / "run" / "results.json").exists()
    # The SFT base is cached: a second run reuses it instead of training again.
    cached = list((tmp_path / "data" / "sft_base").iterdir())
    assert len(cached) == 1 and (cached[0] / "model" / "params").is_dir()


def test_cached_reference_trains_exactly_like_the_reference_copy(tmp_path):
    overrides = ("train.num_steps=3", "optimizer.learning_rate=1e-3")
    copy = _train(_config("dpo.py", *overrides), tmp_path / "copy")
    cached = _train(_config("dpo.py", *overrides, "reference.mode=cache"), tmp_path / "cache")
    fx.tree_allclose(_params(copy.model), _params(cached.model), rtol=1e-5, atol=1e-6)
    assert list((tmp_path / "cache" / "reference_cache").iterdir())  # built under the workdir


def test_lora_base_reference_trains_only_the_adapters(tmp_path):
    config = _config("mdpo.py", "train.num_steps=3", "optimizer.learning_rate=1e-2",
                     "model.lora.enabled=true", "model.lora.rank=4", "model.lora.alpha=8.0",
                     "model.train_projector=false", "reference.mode=lora_base")
    result = _train(config, tmp_path)
    before = jax.device_get(nnx.to_pure_dict(nnx.state(fx.base_model(), nnx.Param)))
    after = jax.device_get(nnx.to_pure_dict(
        nnx.state(result.model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))))
    fx.tree_allclose(before, after, rtol=0, atol=0)  # base weights untouched
    adapters = jax.device_get(nnx.to_pure_dict(nnx.state(result.model, nnx.LoRAParam)))
    assert any(np.abs(x).max() > 0 for x in jax.tree.leaves(adapters) if x.ndim == 2)
    losses = [r["loss/total"] for r in read_metrics(tmp_path)]
    assert np.all(np.isfinite(losses))


def test_bfloat16_compute_and_remat(tmp_path):
    from mmpo_jax.models import presets
    from mmpo_jax.models.llava import Llava
    from mmpo_jax.training.experiment import with_runtime

    tok = fx.tokenizer()
    base = presets.tiny(vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    config = _config("dpo.py", "train.num_steps=2", "optimizer.learning_rate=1e-3")
    runs = {}
    remat = with_runtime(base, _config("dpo.py", "model.remat=true").model)
    assert remat.text_config.remat and remat.text_config.dtype == base.text_config.dtype
    for name, llava_config in {"plain": base, "remat": remat}.items():
        model = Llava(llava_config, rngs=nnx.Rngs(0))
        runs[name] = train(config, model=model, tokenizer=tok, source=list(fx.records(16)),
                           image_config=fx.IMAGE_CONFIG, workdir=tmp_path / name)
    # Rematerialisation recomputes the forward in the backward pass: the same loss and gradient
    # norm at every step (parameters themselves are not compared: Adam's m/sqrt(v) amplifies
    # float-order noise on near-zero gradients).
    plain, remat = (read_metrics(tmp_path / name) for name in ("plain", "remat"))
    for a, b in zip(plain, remat):
        for key in ("loss/total", "optim/grad_norm", "rewards/margins"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6)
    bf16 = presets.tiny(vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                        dtype="bfloat16")
    train(config, model=Llava(bf16, rngs=nnx.Rngs(0)), tokenizer=tok, source=list(fx.records(16)),
          image_config=fx.IMAGE_CONFIG, workdir=tmp_path / "bf16")
    losses = [r["loss/total"] for r in read_metrics(tmp_path / "bf16")]
    assert len(losses) == 2 and np.all(np.isfinite(losses))
