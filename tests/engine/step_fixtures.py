"""Tiny shapes-world records, tokenizer and model shared by the training tests."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mmpo_jax.data import image_processing, pipeline, shapes_world
from mmpo_jax.data.tokenizer import build_word_tokenizer
from mmpo_jax.models import presets
from mmpo_jax.models.llava import Llava
from mmpo_jax.engine import sharding
from mmpo_jax.engine import state as state_lib
from mmpo_jax.engine.step import make_train_step

IMAGE_CONFIG = image_processing.tiny(64)
MODEL_CONFIG = {"lora": {"enabled": False}, "freeze_vision": True, "train_projector": True}


@functools.lru_cache(maxsize=None)
def records(count: int = 16) -> tuple[dict, ...]:
    spec = shapes_world.WorldSpec(preference_size=count)
    return tuple(itertools.islice(shapes_world.generate_split(spec, "preference"), count))


@functools.lru_cache(maxsize=None)
def tokenizer():
    return build_word_tokenizer(shapes_world.vocabulary(), model_max_length=512)


@functools.lru_cache(maxsize=None)
def base_model() -> Llava:
    tok = tokenizer()
    config = presets.tiny(vocab_size=len(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return Llava(config, rngs=nnx.Rngs(0))


def batches(plan, *, batch_size: int = 8, extras=(), sft: bool = False, seed: int = 0,
            buckets=(64, 96), count: int = 16):
    common = dict(tokenizer=tokenizer(), image_config=IMAGE_CONFIG, num_image_tokens=16,
                  batch_size=batch_size, buckets=buckets, seed=seed)
    if sft:
        return pipeline.sft_pipeline(list(records(count)), response_field="chosen", **common)
    return pipeline.preference_pipeline(list(records(count)), extras=extras, **common)


def run_step(plan, method, batch, *, mesh=None, accum_steps: int = 1, tx=None, steps: int = 1):
    """Runs ``steps`` steps on ``mesh`` (default: one device) from the base model; returns the
    trainable state (host) and the metrics of the last step."""
    import optax

    mesh = mesh or sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    rules = sharding.DEFAULT_RULES
    policy = state_lib.copy_model(base_model())
    split = state_lib.split_policy(policy, MODEL_CONFIG)
    ref_graphdef, ref_state = nnx.split(state_lib.copy_model(base_model()))
    place = lambda tree: jax.device_put(tree, sharding.state_shardings(tree, mesh, rules))
    trainable, frozen, ref_state = place(split.trainable), place(split.frozen), place(ref_state)
    tx = tx or optax.sgd(1.0)
    opt_state = jax.jit(tx.init)(trainable)
    put = lambda x: jax.device_put(np.asarray(x), sharding.batch_sharding(mesh, np.ndim(x), rules))
    batch = jax.tree.map(put, batch)
    shard = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
    replicated = NamedSharding(mesh, PartitionSpec())
    fn = make_train_step(
        graphdef=split.graphdef, plan=plan, method_config=method, tx=tx, reference_mode="copy",
        reference_graphdef=ref_graphdef, image_config=IMAGE_CONFIG,
        eos_token_id=tokenizer().eos_token_id, accum_steps=accum_steps,
        in_shardings=(shard(trainable), shard(opt_state), shard(frozen), shard(ref_state),
                      shard(batch), {}, replicated),
        out_shardings=(shard(trainable), shard(opt_state), replicated))
    for index in range(steps):
        trainable, opt_state, metrics = fn(trainable, opt_state, frozen, ref_state, batch, {},
                                           jax.random.key(index))
    host = jax.device_get(nnx.to_pure_dict(trainable))
    return host, {k: float(s) / max(float(c), 1.0) for k, (s, c) in jax.device_get(metrics).items()}


def as_numpy(batch):
    return jax.tree.map(np.asarray, batch)


def tree_allclose(a, b, *, rtol, atol):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    worst = 0.0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)
        worst = max(worst, float(np.max(np.abs(np.asarray(x) - np.asarray(y)))))
    return worst


__all__ = ["records", "tokenizer", "base_model", "batches", "run_step", "tree_allclose",
           "IMAGE_CONFIG", "MODEL_CONFIG", "jnp"]
