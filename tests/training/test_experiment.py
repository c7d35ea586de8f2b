"""The main job's initial model: a converted checkpoint takes the run's dtypes and remat."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmpo_jax import convert as convert_cli
from mmpo_jax.training.config_loading import load_config
from mmpo_jax.training.experiment import initial_model
from tests.training import step_fixtures as fx


def test_checkpoint_init_runs_with_the_configs_dtypes_and_remat(tmp_path):
    saved = fx.base_model()  # float32 compute and storage, no remat
    convert_cli.save_checkpoint(saved, saved.config, tmp_path / "orbax")
    config = load_config("configs/dpo.py", (
        "model.init=checkpoint", f"model.checkpoint={tmp_path / 'orbax'}",
        "model.dtype=bfloat16", "model.param_dtype=bfloat16", "model.remat=true"))
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
    # the stored config is untouched: loading it plainly gives the float32 model back
    plain, stored_config = convert_cli.load_checkpoint(tmp_path / "orbax")
    assert stored_config == saved.config and not stored_config.text_config.remat
