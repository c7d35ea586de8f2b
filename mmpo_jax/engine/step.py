"""The training step: one ``jax.jit`` with explicit shardings, donated state, gradient accumulation.

``make_train_step`` returns ``step(trainable, opt_state, frozen, reference, batch, cached, key)
-> (trainable, opt_state, metrics)``:

- ``trainable`` / ``opt_state`` are donated and come back with the same shardings;
- ``frozen`` (the policy's untrained part) and ``reference`` (a frozen copy's state, or None) are
  read-only inputs;
- ``batch`` is a ``Batch`` / ``SftBatch`` of global arrays sharded over the batch axes;
  ``cached`` holds precomputed reference outputs (``{}`` unless the reference mode is ``cache``);
- ``key`` seeds the policy's dropout streams for this step (``fold_in(run key, step)``).

The loss is ``sum_b example_mask_b * loss_b / sum_b example_mask_b``: padding rows carry no weight
and metrics count real examples only (the objective is evaluated per example with ``vmap`` and its
(sum, count) metrics are masked). With ``accum_steps = A`` the batch is cut into ``A`` interleaved
micro-batches (rows ``a, a + A, ...``: every device keeps a share of each one), scanned with
gradients summed, so the update equals the update of the whole batch.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mmpo_jax.data.image_processing import ImageProcessorConfig
from mmpo_jax.engine.reference import MODES, reference_model
from mmpo_jax.engine.scoring import ScoringPlan, score_batch
from mmpo_jax.objectives import registry
from mmpo_jax.objectives.metrics import Metric, accumulate


def masked_objective(method_config: Mapping[str, Any], scored: Mapping[Any, jax.Array],
                     example_mask: jax.Array) -> tuple[jax.Array, dict[str, Metric]]:
    """``(sum of real examples' losses, metrics over real examples)`` of a method.

    Each example is evaluated on its own (``vmap``), so no statistic of padding rows reaches a
    real one, unless a term couples the examples (a group baseline), which sees the whole batch.

    Args:
      scored: ``registry.compute_objective``'s inputs, every array batch-major ``[B, ...]``.
      example_mask: ``[B]``, 1 on real examples.
    """
    mask = jnp.asarray(example_mask, jnp.float32)
    if registry.couples_examples(method_config):
        losses, metrics = registry.compute_objective(method_config, scored)
        return jnp.sum(losses * mask), metrics
    single = jax.tree.map(lambda x: x[:, None], dict(scored))
    losses, metrics = jax.vmap(lambda s: registry.compute_objective(method_config, s))(single)
    metrics = {k: (jnp.sum(s * mask), jnp.sum(c * mask)) for k, (s, c) in metrics.items()}
    return jnp.sum(losses[:, 0] * mask), metrics


def reseed_dropout(state: Any, key: jax.Array) -> Any:
    """``state`` with every ``dropout`` RNG stream restarted from its own fold of ``key``.

    Done on the state, before the model is merged inside ``value_and_grad``: NNX forbids mutating
    a stream created at another trace level. Stream ``i`` (in path order) gets
    ``fold_in(key, i)`` and count 0, so layers draw different masks and a resumed run the same.
    """
    index = iter(range(1 << 30))

    def reseed(path, leaf):
        names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        if "dropout" not in names:
            return leaf
        if names[-1] == "key" or (len(names) > 1 and names[-2] == "key"):
            return jax.random.fold_in(key, next(index))
        if names[-1] == "count" or (len(names) > 1 and names[-2] == "count"):
            return jnp.zeros_like(leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(reseed, state)


def _micro_batches(tree: Any, accum_steps: int) -> Any:
    """``[B, ...] -> [A, B/A, ...]``, micro-batch ``a`` holding rows ``a, a + A, ...``."""
    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, tree)


def make_train_step(
    *,
    graphdef: Any,
    plan: ScoringPlan,
    method_config: Mapping[str, Any],
    tx: optax.GradientTransformation,
    reference_mode: str,
    reference_graphdef: Any = None,
    image_config: ImageProcessorConfig,
    eos_token_id: int,
    vision_frozen: bool = True,
    accum_steps: int = 1,
    has_dropout: bool = False,
    in_shardings: tuple | None = None,
    out_shardings: tuple | None = None,
) -> Callable:
    """The jitted step (see the module doc).

    Args:
      graphdef: the policy's ``nnx`` graph definition (``state.PolicySplit.graphdef``).
      plan: what to score (``scoring.plan_scoring``); method_config: the method block.
      tx: the optax transformation.
      reference_mode: ``copy`` (``reference`` is the copy's state, ``reference_graphdef`` its
        graph), ``lora_base`` (the policy with adapters off) or ``cache`` (``cached`` inputs).
      image_config, eos_token_id, vision_frozen: see ``scoring.score_batch``.
      accum_steps: micro-batches per step; the batch size must be a multiple.
      has_dropout: the policy has dropout streams to reseed from ``key`` every step.
      in_shardings / out_shardings: ``jax.jit``'s, for ``(trainable, opt_state, frozen,
        reference, batch, cached, key)`` and ``(trainable, opt_state, metrics)``; None lets jit
        infer them from the arguments.
    """
    if reference_mode not in MODES:
        raise ValueError(f"reference mode {reference_mode!r} is not one of {MODES}")
    method_config = dict(method_config)

    def loss_fn(trainable, frozen, reference_state, batch, cached, key, count):
        # Fresh Variables at this trace level: dropout streams advance their counts in place.
        policy = nnx.merge(graphdef, trainable, jax.tree.map(lambda x: x, frozen))
        reference = reference_model(reference_mode, policy, reference_graphdef, reference_state)
        scored = score_batch(plan, policy, reference, batch, image_config=image_config,
                             eos_token_id=eos_token_id, vision_frozen=vision_frozen,
                             cached=cached)
        with jax.named_scope("loss"):
            loss_sum, metrics = masked_objective(method_config, scored, batch.example_mask)
        return loss_sum / count, metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(trainable, opt_state, frozen, reference_state, batch, cached, key):
        if has_dropout:
            frozen = reseed_dropout(frozen, key)
        count = jnp.maximum(jnp.sum(batch.example_mask.astype(jnp.float32)), 1.0)
        if accum_steps == 1:
            (loss, metrics), grads = grad_fn(trainable, frozen, reference_state, batch, cached,
                                             key, count)
        else:
            micro = _micro_batches((batch, cached), accum_steps)

            def body(carry, inputs):
                grads_sum, metrics_sum = carry
                index, (micro_batch, micro_cached) = inputs
                (_, metrics), grads = grad_fn(trainable, frozen, reference_state, micro_batch,
                                              micro_cached, jax.random.fold_in(key, index), count)
                grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
                return (grads_sum, accumulate(metrics_sum, metrics)), None

            first_metrics = jax.eval_shape(
                lambda: grad_fn(trainable, frozen, reference_state,
                                jax.tree.map(lambda x: x[0], micro[0]),
                                jax.tree.map(lambda x: x[0], micro[1]), key, count)[0][1])
            zeros = (jax.tree.map(jnp.zeros_like, trainable),
                     jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first_metrics))
            (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
        with jax.named_scope("update"):
            updates, opt_state = tx.update(grads, opt_state, trainable)
            trainable = optax.apply_updates(trainable, updates)
        metrics = dict(metrics)
        one = jnp.asarray(1.0, jnp.float32)
        metrics["optim/grad_norm"] = (optax.tree.norm(grads), one)
        metrics["examples"] = (count, one)
        return trainable, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1), in_shardings=in_shardings,
                   out_shardings=out_shardings)
