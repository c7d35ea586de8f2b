"""The main job's initial model: a converted checkpoint takes the run's dtypes and remat, and is
restored straight into the run's shards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmpo_jax.engine import model_io
from mmpo_jax.engine import sharding
from mmpo_jax.config.loading import load_config
from mmpo_jax.training.experiment import initial_model, run_experiment
from mmpo_jax.training.loop import train
from tests.engine import step_fixtures as fx


def test_checkpoint_init_runs_with_the_configs_dtypes_and_remat(tmp_path):
    saved = fx.base_model()  # float32 compute and storage, no remat
    model_io.save_model(saved, tmp_path / "orbax")
    config = load_config("configs/dpo.py", (
        "model.init=checkpoint", f"model.checkpoint={tmp_path / 'orbax'}",
        "model.dtype=bfloat16", "model.param_dtype=bfloat16", "model.remat=true",
        "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.num_steps=1",
        "train.progress_bar=false", "data.batch_size=8", "data.buckets=(64,96)",
        "checkpoint.async_save=false"))
    model = initial_model(config, fx.tokenizer())
    text, vision = model.config.text_config, model.config.vision_config
    assert text.remat and (text.dtype, text.param_dtype) == ("bfloat16", "bfloat16")
    assert (vision.dtype, vision.param_dtype) == ("bfloat16", "bfloat16")
    params = jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    expected = jax.tree.leaves(nnx.to_pure_dict(nnx.state(saved, nnx.Param)))
    assert all(p.dtype == jnp.bfloat16 for p in params)
    for ours, stored in zip(params, expected):  # the stored values, rounded to bfloat16
        np.testing.assert_array_equal(np.asarray(ours, np.float32),
                                      np.asarray(jnp.asarray(stored, jnp.bfloat16), np.float32))
    # every parameter arrives in its shards, as the trainer places it
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    state = nnx.state(model, nnx.Param)
    wanted = jax.tree.leaves(nnx.to_pure_dict(sharding.state_shardings(state, mesh)))
    placed = [p.sharding for p in params]
    assert all(got.is_equivalent_to(want, p.ndim) for got, want, p in zip(placed, wanted, params))
    assert any(not s.is_fully_replicated for s in placed)
    # the stored config is untouched: loading it plainly gives the float32 model back
    plain, stored_config = model_io.load_model(tmp_path / "orbax")
    assert stored_config == saved.config and not stored_config.text_config.remat
    # and it trains from there
    result = train(config, model=model, tokenizer=fx.tokenizer(), source=list(fx.records(8)),
                   image_config=fx.IMAGE_CONFIG, workdir=tmp_path / "run")
    assert result.steps == 1 and np.isfinite(result.summary["metrics"]["loss/total"]["last"])


def test_p2dpo_without_generation_settings_is_refused_before_any_work(tmp_path):
    config = load_config("configs/p2dpo.py", (f"data.data_dir={tmp_path}",))
    with pytest.raises(ValueError, match=r"needs the pair-generation settings"):
        run_experiment(config)
    assert not any(tmp_path.iterdir())  # nothing loaded, built or trained
