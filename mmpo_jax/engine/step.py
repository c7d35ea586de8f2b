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

NaN/inf guard (``guarded_update``): a step whose loss or gradient norm is not finite leaves
``trainable`` and ``opt_state`` as they were. The decision is a ``jnp.where`` on the device values
inside the jit (no host sync); the step's metrics say it happened (``optim/skipped``, and which
value was bad: ``optim/nonfinite_loss``, ``optim/nonfinite_grad_norm``, each 0 or 1 per step) and
``training.divergence`` stops a run after ``train.max_bad_steps`` such steps in a row. [our
choice] The optimizer state is kept too, so a skipped step does not advance the step count of the
learning-rate schedule or Adam's moments: the next good step is the update the bad one would
have been.
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


SKIPPED = "optim/skipped"
NONFINITE_LOSS = "optim/nonfinite_loss"
NONFINITE_GRAD_NORM = "optim/nonfinite_grad_norm"
GRAD_NORM = "optim/grad_norm"


def guarded_update(tx: optax.GradientTransformation, grads: Any, opt_state: Any, params: Any,
                   loss: jax.Array) -> tuple[Any, Any, dict[str, Metric]]:
    """``tx``'s update of ``params``, or no change when ``loss`` or the gradient norm is NaN/inf.

    Args:
      tx: the optimizer; grads, params: pytrees of one structure; opt_state: ``tx``'s state.
      loss: the scalar loss the gradients are of.

    Returns:
      ``(params, opt_state, metrics)``: the updated (or unchanged) pair, and ``GRAD_NORM`` (the
      gradients' global L2 norm, before clipping) and the guard's 0/1 flags ``SKIPPED``,
      ``NONFINITE_LOSS``, ``NONFINITE_GRAD_NORM`` as ``(value, 1)`` metrics.
    """
    grad_norm = optax.tree.norm(grads)
    loss_finite, norm_finite = jnp.isfinite(loss), jnp.isfinite(grad_norm)
    apply = loss_finite & norm_finite
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    params, opt_state = jax.tree.map(lambda new, old: jnp.where(apply, new, old),
                                     (new_params, new_opt_state), (params, opt_state))
    one = jnp.asarray(1.0, jnp.float32)

    def flag(condition):
        return (condition.astype(jnp.float32), one)

    return params, opt_state, {GRAD_NORM: (grad_norm, one), SKIPPED: flag(~apply),
                               NONFINITE_LOSS: flag(~loss_finite),
                               NONFINITE_GRAD_NORM: flag(~norm_finite)}


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
                grads_sum, loss_sum, metrics_sum = carry
                index, (micro_batch, micro_cached) = inputs
                (loss, metrics), grads = grad_fn(trainable, frozen, reference_state, micro_batch,
                                                 micro_cached, jax.random.fold_in(key, index),
                                                 count)
                grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
                return (grads_sum, loss_sum + loss.astype(jnp.float32),
                        accumulate(metrics_sum, metrics)), None

            first_metrics = jax.eval_shape(
                lambda: grad_fn(trainable, frozen, reference_state,
                                jax.tree.map(lambda x: x[0], micro[0]),
                                jax.tree.map(lambda x: x[0], micro[1]), key, count)[0][1])
            zeros = (jax.tree.map(jnp.zeros_like, trainable), jnp.zeros((), jnp.float32),
                     jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first_metrics))
            (grads, loss, metrics), _ = jax.lax.scan(body, zeros,
                                                     (jnp.arange(accum_steps), micro))
        with jax.named_scope("update"):
            trainable, opt_state, guard_metrics = guarded_update(tx, grads, opt_state, trainable,
                                                                 loss)
        metrics = {**metrics, **guard_metrics}
        metrics["examples"] = (count, jnp.asarray(1.0, jnp.float32))
        return trainable, opt_state, metrics

    return jax.jit(step, donate_argnums=(0, 1), in_shardings=in_shardings,
                   out_shardings=out_shardings)
