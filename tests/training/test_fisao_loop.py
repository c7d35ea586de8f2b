"""FiSAO's loop: log-probs of the samples, PPO updates with zero advantages, a short run."""

from __future__ import annotations

import functools
import logging

import jax
import jax.monitoring
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mmpo_jax.engine.step import masked_objective
from mmpo_jax.objectives import fisao as fisao_objective
from mmpo_jax.objectives import logprobs, terms
from mmpo_jax.pipelines import fisao
from mmpo_jax.pipelines.verifier import WordClipSpec
from mmpo_jax.config import checks as config_checks
from mmpo_jax.training import fisao_loop
from mmpo_jax.engine import state as state_lib
from mmpo_jax.config.loading import load_config
from mmpo_jax.training.logging import read_metrics
from tests.pipelines.test_fisao import rollout as sampled  # noqa: F401 (a fixture)
from tests.pipelines.test_verifier import random_word_clip
from tests.engine import step_fixtures as fx

BANNED = jnp.asarray([fx.base_model().config.image_token_id])
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def rollout(sampled):
    return sampled[0]


def _perturbed(model, scale: float, seed: int):
    """A copy of ``model`` with noise on every parameter (a reference that differs)."""
    copy = state_lib.copy_model(model)
    params = nnx.state(copy, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(copy, jax.tree.unflatten(tree, noisy))
    return copy


def test_old_log_probs_are_the_sampling_distribution(rollout):
    old = nnx.jit(fisao_loop.response_token_logps)(fx.base_model(), rollout, BANNED)
    np.testing.assert_allclose(old, rollout.sampler_logps, rtol=1e-5, atol=1e-5)


def _full_logits_logps(model, batch, banned):
    """The log-probs as FiSAO computed them before issue 16: the full ``[B, T + M - 1, V]``
    logits, the banned columns at ``-inf``, the response slice read by ``token_logprobs``."""
    out = model(batch.sequences[:, :-1], pixel_values=batch.pixel_values,
                attention_mask=batch.attention_mask[:, :-1])
    logits = out.logits[:, batch.prompt_length - 1:].at[..., banned].set(-jnp.inf)
    return logprobs.token_logprobs(logits, batch.new_tokens, batch.response_mask)


def _left_padded(batch, extra: int):
    """``batch`` with ``extra`` more pad columns left of the prompt (masked out)."""
    pad = lambda x, value: jnp.pad(x, ((0, 0), (extra, 0)), constant_values=value)
    return batch.replace(sequences=pad(batch.sequences, fx.tokenizer().pad_token_id),
                         attention_mask=pad(batch.attention_mask, False),
                         prompt_length=batch.prompt_length + extra)


def test_kept_positions_log_probs_and_ppo_loss_match_the_full_logits(rollout):
    """Scoring only the response positions changes nothing: the log-probs and the PPO loss equal
    the full-logits path's, also in chunks (with a tail) and with more prompt padding."""
    model = fx.base_model()
    noise = jax.random.normal(jax.random.key(3), (2,) + rollout.response_mask.shape)
    method = {"name": "fisao", "beta_kl": 0.05}

    def loss(batch, old, logps):
        fixed = fisao_loop.fixed_scores(batch, noise[0], old,
                                        jnp.where(batch.response_mask, old + 0.1 * noise[1], 0.0))
        scored = {**fixed, terms.token_logps(terms.POLICY, fisao_objective.SAMPLE): logps}
        return masked_objective(method, scored, batch.example_mask)[0]

    @nnx.jit
    def paths(model):
        old = _full_logits_logps(model, rollout, BANNED)
        padded = _left_padded(rollout, 8)
        kept = {"kept": fisao_loop.response_token_logps(model, rollout, BANNED),
                "padded": fisao_loop.response_token_logps(model, padded, BANNED),
                "chunked": fisao_loop.response_token_logps(model, rollout, BANNED, chunk_size=3)}
        # the old policy moved a little, so the ratio (and the loss) depend on the log-probs
        moved = jnp.where(rollout.response_mask, old + 0.05 * noise[1], 0.0)
        return ({name: (logps, loss(rollout, moved, logps)) for name, logps in kept.items()},
                (old, loss(rollout, moved, old)), _full_logits_logps(model, rollout, BANNED[:0]))

    kept, (want, want_loss), unbanned = paths(model)
    # The image placeholder has a real probability under the random model: banning it matters.
    assert np.max(np.abs(unbanned - want)) > 1e-3
    assert float(want_loss) != 0.0 and np.all(want[rollout.response_mask] < 0)
    for name, (logps, kept_loss) in kept.items():
        np.testing.assert_allclose(logps, want, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(kept_loss, want_loss, rtol=1e-5, err_msg=name)


@functools.lru_cache(maxsize=None)
def _policy():
    return state_lib.split_policy(state_lib.copy_model(fx.base_model()), fx.MODEL_CONFIG)


@functools.lru_cache(maxsize=None)
def _scorer():
    ref_graphdef = nnx.graphdef(fx.base_model())
    return fisao_loop.make_rollout_scorer(_policy().graphdef, reference_mode="copy",
                                          reference_graphdef=ref_graphdef)


TX = optax.adamw(1e-3, weight_decay=0.0)


@functools.lru_cache(maxsize=None)
def _update(beta_kl: float):
    return fisao_loop.make_ppo_update(_policy().graphdef, {"name": "fisao", "beta_kl": beta_kl},
                                      TX)


def _update_once(rollout, rewards, *, beta_kl: float, reference):
    """One PPO update from the base model; returns (old, new) trainable states on the host."""
    split = _policy()
    old, ref = _scorer()(split.trainable, split.frozen, nnx.state(reference), rollout, BANNED)
    before = jax.device_get(nnx.to_pure_dict(split.trainable))
    trainable = jax.tree.map(jnp.copy, split.trainable)
    fixed = fisao_loop.fixed_scores(rollout, rewards, old, ref)
    trainable, _, metrics = _update(beta_kl)(trainable, TX.init(trainable), split.frozen,
                                             rollout, fixed, BANNED)
    return before, jax.device_get(nnx.to_pure_dict(trainable)), metrics, (old, ref)


def _max_change(before, after) -> float:
    return max(float(np.max(np.abs(a - b)))
               for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_zero_rewards_without_kl_leave_the_policy_unchanged(rollout):
    zero = jnp.zeros(rollout.response_mask.shape)
    reference = _perturbed(fx.base_model(), 0.05, seed=1)  # even a distant reference
    before, after, metrics, _ = _update_once(rollout, zero, beta_kl=0.0, reference=reference)
    assert _max_change(before, after) == 0.0
    assert float(metrics["optim/grad_norm"][0]) == 0.0


def test_zero_rewards_with_kl_move_the_policy_only_by_the_kl_term(rollout):
    zero = jnp.zeros(rollout.response_mask.shape)
    # The reference equals the policy: the KL penalty is 0 and nothing moves.
    before, same, _, _ = _update_once(rollout, zero, beta_kl=0.05,
                                      reference=state_lib.copy_model(fx.base_model()))
    assert _max_change(before, same) == 0.0
    # A different reference: the update is the one of the KL penalty as the only reward.
    reference = _perturbed(fx.base_model(), 0.05, seed=1)
    _, moved, _, (old, ref) = _update_once(rollout, zero, beta_kl=0.05, reference=reference)
    assert _max_change(before, moved) > 1e-6
    penalty = jnp.where(rollout.response_mask, -0.05 * (old - ref), 0.0)
    _, as_reward, _, _ = _update_once(rollout, penalty, beta_kl=0.0, reference=reference)
    fx.tree_allclose(moved, as_reward, rtol=1e-5, atol=1e-7)


def test_prompt_order_is_a_function_of_seed_and_step():
    steps = [fisao_loop.prompt_indices(s, 3, 7, seed=0) for s in range(7)]
    flat = np.concatenate(steps)
    for epoch in range(3):  # every record once per epoch
        assert sorted(flat[epoch * 7:(epoch + 1) * 7]) == list(range(7))
    np.testing.assert_array_equal(steps[4], fisao_loop.prompt_indices(4, 3, 7, seed=0))
    assert list(fisao_loop.prompt_indices(1, 3, 7, seed=0, shuffle=False)) == [3, 4, 5]


def _config(tmp_path, *overrides):
    world = ("data.builder={'sft_size': 40, 'preference_size': 16, 'test_caption_size': 4, "
             "'test_pope_images': 2}")
    config = load_config("configs/fisao.py", (
        world, f"data.data_dir={tmp_path / 'data'}", "train.progress_bar=false",
        "train.log_every=1", "data.batch_size=8", "checkpoint.async_save=false",
        "rollout.max_new_tokens=10", "optimizer.learning_rate=1e-3") + overrides)
    config_checks.validate(config, device_count=jax.device_count())
    return config


class _Events(logging.Handler):
    """Records compilations and the loop's step markers, in order."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.events = []

    def emit(self, record):
        if "rollout steps" in record.getMessage():
            self.events.append(("end", None))
        elif "rollout step" in record.getMessage():
            self.events.append(("step", record.args[0]))

    def compiled(self, name, *args, **kwargs):
        if name == COMPILE_EVENT:
            self.events.append(("compile", None))


@pytest.mark.slow
def test_fisao_runs_logs_rewards_and_compiles_once(tmp_path):
    config = _config(tmp_path, "train.num_steps=3")
    events = _Events()
    loop_logger = logging.getLogger(fisao_loop.__name__)
    loop_logger.addHandler(events)
    old_level = loop_logger.level
    loop_logger.setLevel(logging.DEBUG)
    jax.monitoring.register_event_duration_secs_listener(events.compiled)
    try:
        result = fisao_loop.train_fisao(
            config, model=fx.base_model(), tokenizer=fx.tokenizer(), source=list(fx.records(16)),
            image_config=fx.IMAGE_CONFIG, workdir=tmp_path / "run",
            verifier_spec=WordClipSpec(hidden_size=32, conv_channels=(8, 8, 16, 16),
                                       projection_dim=16, train_steps=3, batch_size=8,
                                       holdout=10),
            calibration=fisao.Calibration(mu_c=0.1, mu_h=-0.1, num_correct=1,
                                          num_hallucinated=1))
    finally:
        jax.monitoring.unregister_event_duration_listener(events.compiled)
        loop_logger.removeHandler(events)
        loop_logger.setLevel(old_level)
    assert result.steps == 3
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    for name in ("rollout/object_reward", "rollout/positive_fraction", "kl/ref",
                 "ppo/clip_fraction", "loss/ppo", "rewards/token"):
        values = [r[name] for r in records]
        assert np.all(np.isfinite(values)), (name, values)
    assert max(r["rollout/sampler_logp_gap"] for r in records) < 1e-4
    assert records[0]["ppo/approx_kl"] == pytest.approx(0.0, abs=1e-6)  # ratio 1 at epoch 0
    params = jax.tree.leaves(nnx.state(result.model, nnx.Param))
    assert all(np.all(np.isfinite(p)) for p in params)
    # Every jitted piece compiled during the first step: nothing compiles in the later ones.
    second, end = events.events.index(("step", 2)), events.events.index(("end", None))
    assert events.events[second:end] == [("step", 2), ("step", 3)], events.events[second:end]
    assert ("compile", None) in events.events[events.events.index(("step", 1)):second]
    assert (tmp_path / "run" / "fisao.json").exists()


@pytest.mark.slow
def test_resumed_fisao_run_matches_the_uninterrupted_one(tmp_path):
    config = _config(tmp_path, "train.num_steps=2", "checkpoint.save_every=1")
    common = dict(model=fx.base_model(), tokenizer=fx.tokenizer(), source=list(fx.records(16)),
                  image_config=fx.IMAGE_CONFIG, verifier=random_word_clip(),
                  calibration=fisao.Calibration(mu_c=0.1, mu_h=-0.1, num_correct=1,
                                                num_hallucinated=1))
    whole = fisao_loop.train_fisao(config, workdir=tmp_path / "whole", **common)
    first = fisao_loop.train_fisao(config, workdir=tmp_path / "resumed", stop_at=1, **common)
    assert first.steps == 1
    resumed = fisao_loop.train_fisao(config, workdir=tmp_path / "resumed", **common)
    fx.tree_allclose(jax.device_get(nnx.to_pure_dict(nnx.state(whole.model, nnx.Param))),
                     jax.device_get(nnx.to_pure_dict(nnx.state(resumed.model, nnx.Param))),
                     rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in read_metrics(tmp_path / "resumed")] == [1, 2]
