"""The main job's initial model: a converted checkpoint takes the run's dtypes and remat, and is
restored straight into the run's shards; an image size the model does not take is refused before
anything compiles; a run's length follows its split."""

import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import pytest
from flax import nnx

from mmpo_jax.engine import model_io
from mmpo_jax.engine import sharding
from mmpo_jax.config.checks import ConfigError, epoch_steps
from mmpo_jax.config.loading import load_config
from mmpo_jax.data.tokenizer import build_word_tokenizer
from mmpo_jax.engine.scoring import plan_scoring
from mmpo_jax.training import experiment
from mmpo_jax.training.experiment import (check_image_size, initial_model, load_data,
                                          model_config, run_experiment, with_epoch_steps)
from mmpo_jax.training.loop import make_iterator, train
from tests.data import fixtures as data_fx
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


def test_p2dpo_without_its_pairs_section_is_refused_before_any_work(tmp_path):
    config = load_config("configs/p2dpo.py", (f"data.data_dir={tmp_path}",)).to_dict()
    del config["pairs"]
    with pytest.raises(ValueError, match="needs the config's pairs section"):
        run_experiment(ml_collections.ConfigDict(config))
    assert not any(tmp_path.iterdir())  # nothing loaded, built or trained


def test_real_format_data_with_the_tiny_model_is_refused_before_compiling(tmp_path):
    data_fx.write_jsonl(str(tmp_path / "manual"), [data_fx.jsonl_line(p)
                                                    for p in data_fx.make_pairs(3)])
    build_word_tokenizer(["a", "cat"], model_max_length=64).save_pretrained(str(tmp_path / "tok"))
    overrides = ("data.dataset=generic_jsonl", "data.split=train", "model.init=random",
                 f"data.manual_dir={tmp_path / 'manual'}", f"data.tokenizer={tmp_path / 'tok'}",
                 f"data.data_dir={tmp_path / 'data'}", "eval.enabled=false",
                 f"workdir={tmp_path / 'run'}")
    with pytest.raises(ConfigError, match=r"preprocessed to 336 px but the vision tower of "
                                          r"model.preset='tiny' takes 64 px; set data.image_size=64"):
        run_experiment(load_config("configs/dpo.py", overrides))
    assert not (tmp_path / "run").exists()  # nothing trained
    resized = load_config("configs/dpo.py", overrides + ("data.image_size=64",))
    _, tokenizer, image_config = load_data(resized)
    assert (image_config.size, image_config.crop_size, image_config.pad_to_square) == (64, 64, True)
    check_image_size(resized, tokenizer, image_config)


@pytest.mark.parametrize("drop_remainder", [False, True])
def test_the_runs_length_is_the_pipelines_epochs(drop_remainder):
    """``train.num_steps=0``: exactly the batches ``data.num_epochs`` passes yield."""
    config = load_config("configs/dpo.py", (
        "train.num_steps=0", "data.num_epochs=2", "data.batch_size=4", "data.buckets=(64,96)",
        f"data.drop_remainder={str(drop_remainder).lower()}"))
    source = list(fx.records(10))
    batches = list(make_iterator(config, source, tokenizer=fx.tokenizer(),
                                 image_config=fx.IMAGE_CONFIG, num_image_tokens=16,
                                 plan=plan_scoring(config.method.to_dict())))
    steps = epoch_steps(config, len(source))
    assert len(batches) == steps == (4 if drop_remainder else 6)
    examples = sum(int(b.example_mask.sum()) for b in batches)
    assert examples == (16 if drop_remainder else 20)
    resolved = with_epoch_steps(config, len(source))
    assert resolved.train.num_steps == steps and config.train.num_steps == 0
    assert with_epoch_steps(resolved, len(source)) is resolved


def test_a_cached_reference_holds_every_record_when_batches_drop_the_remainder(tmp_path):
    """The cache is built over one whole epoch: records a training epoch drops (another each
    epoch, as the permutation changes) are still scored when a later epoch reads them."""
    config = load_config("configs/dpo.py", (
        "train.num_steps=0", "data.num_epochs=3", "data.batch_size=8", "data.buckets=(64,96)",
        "data.drop_remainder=true", "reference.mode=cache", "train.progress_bar=false",
        "checkpoint.async_save=false", "eval.enabled=false"))
    source = list(fx.records(12))
    config = with_epoch_steps(config, len(source))
    result = train(config, model=fx.base_model(), tokenizer=fx.tokenizer(), source=source,
                   image_config=fx.IMAGE_CONFIG, workdir=tmp_path)
    assert result.steps == 3  # one full batch of 8 per epoch
    assert np.isfinite(result.summary["metrics"]["loss/total"]["last"])


def test_the_main_job_reads_v2_with_its_preset_and_normalisation(tmp_path):
    """On shapes world v2 the job builds `tiny_v2` (64 visual tokens) sized by the data's
    tokenizer, and preprocesses with the world's CLIP constants (the noise interventions'
    strength is defined in those units)."""
    world = ("data.builder={'world': 'v2', 'sft_size': 4, 'sft_focus_size': 2, 'preference_size': 4, "
             "'validation_caption_size': 1, 'validation_pope_images': 1, "
             "'test_caption_size': 1, 'test_pope_images': 1}")
    config = load_config("configs/dpo.py", (world, f"data.data_dir={tmp_path}",
                                            "model.preset=tiny_v2", "sft_base.focus_split=sft_focus"))
    _, tokenizer, image_config = load_data(config)
    assert image_config.size == 128
    focus = experiment.focus_source(experiment.sft_base_config(config))  # the base's two-image mix
    assert len(focus) == 2 and all(focus[i]["focus_image"].shape[-1] == 3 for i in range(2))
    assert experiment.focus_source(load_config("configs/dpo.py")) is None
    np.testing.assert_allclose(image_config.mean, (0.48145466, 0.4578275, 0.40821073))
    llava = model_config(config, tokenizer)
    assert llava.num_image_tokens == 64 and llava.text_config.vocab_size == len(tokenizer)
    check_image_size(config, tokenizer, image_config)  # accepted: the preset takes 128 px
