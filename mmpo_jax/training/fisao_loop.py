"""FiSAO's on-policy loop: rollouts, verifier rewards and PPO updates (METHODS.md §6).

``train_fisao(config, model=..., tokenizer=..., source=..., image_config=...)`` trains ``model``
(the initial policy, e.g. the SFT base) for ``config.train.num_steps`` rollout steps. One step:

1. ``P = data.batch_size / rollout.num_samples`` prompts (records of ``source`` with "image" and
   "prompt", in a per-epoch permutation fixed by the seed), ``n = rollout.num_samples`` samples
   each from the current policy (``pipelines.fisao.sample_rollouts``, jitted ``generate``);
2. object words, verifier scores and calibrated token rewards (``pipelines.fisao``);
3. one jitted forward of the sampling policy and of the frozen reference over the samples:
   ``old`` and ``ref`` per-token log-probs (the LM head at the response positions only,
   ``response_token_logps``);
4. ``rollout.ppo_epochs`` jitted PPO-clip updates over the whole batch
   (``registry.compute_objective`` with the ``fisao_ppo`` term, through
   ``step.masked_objective``: one update per epoch, the group baseline spans the batch
   [our choice: no mini-batches, so every group stays whole]); state donated.

``train.num_steps`` counts rollout steps; the optimizer (and its schedule) takes
``num_steps * ppo_epochs`` updates. [our choice] The policy runs without dropout (LoRA dropout
off) for sampling, scoring and updates, so the importance ratio is exactly 1 at the first epoch.
The image placeholder is banned in sampling and, identically, in every log-prob (its logit is
``-inf``), so ``old`` is the distribution the tokens were drawn from (at temperature 1).

Verifier and calibration: given by the caller, or on the shapes world built here and cached on
disk under ``<data.data_dir>/fisao_verifier/`` (a word-level CLIP trained on the ``sft`` split,
``pipelines.verifier.cached_word_clip``) and ``<data.data_dir>/fisao_calibration/`` (keyed by the
verifier, the initial policy's parameters and the sampling settings). Calibration records: up to
``CALIBRATION_RECORDS`` caption records of the ``sft`` split's tail that the verifier never trained
on [our choice: ``sft`` holds ground truth and is not an evaluation split; the tail keeps the
verifier honest]. The run writes ``<workdir>/fisao.json`` (calibration and the verifier's
discrimination on that tail), plus what ``training.loop.train`` writes: ``checkpoints/``
(resumable: the prompt order and the sampling keys are functions of the seed and the step),
``metrics.jsonl``, ``tensorboard/``, ``summary.json``. Single process: the rollout batch is built
on the host and placed on the mesh over the batch axes (a multi-host run would need per-process
prompt shards) [our choice].
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from mmpo_jax.config import checks as config_checks
from mmpo_jax.data import shapes_world
from mmpo_jax.data.image_processing import ImageProcessorConfig
from mmpo_jax.data.sources import load_split
from mmpo_jax.engine import optimizer as optimizer_lib
from mmpo_jax.engine import reference as reference_lib
from mmpo_jax.engine import reference_cache, sharding
from mmpo_jax.engine import state as state_lib
from mmpo_jax.engine.step import masked_objective
from mmpo_jax.models.llava import Llava
from mmpo_jax.objectives import logprobs, registry
from mmpo_jax.objectives import terms as terms_lib
from mmpo_jax.objectives.fisao import PPO_READS, SAMPLE
from mmpo_jax.objectives.metrics import Metric, accumulate, mean_metric
from mmpo_jax.pipelines import fisao as rollouts
from mmpo_jax.pipelines import verifier as verifier_lib
from mmpo_jax.pipelines.fisao import Calibration, ObjectVocabulary, RolloutBatch
from mmpo_jax.pipelines.verifier import Verifier, WordClipSpec
from mmpo_jax.training import loop
from mmpo_jax.training.loop import TrainResult

logger = logging.getLogger(__name__)

SHAPES_WORLD = "shapes_world"
CALIBRATION_RECORDS = 256
VERIFIER_HOLDOUT = 512


# ----------------------------------------------------------------------------- jitted pieces


def response_token_logps(model: Llava, batch: RolloutBatch, banned_token_ids: jax.Array, *,
                         chunk_size: int | None = logprobs.DEFAULT_CHUNK_SIZE) -> jax.Array:
    """Teacher-forced log-probs of the sampled response tokens: ``[B, M]`` float32, 0 off the
    response; the ``banned_token_ids`` ``[K]`` get logit ``-inf`` as in sampling.

    Logits only where the loss reads them (issue 16): the response slots sit at the same ``M``
    positions of every row, so the forward keeps the final hidden states of the ``M`` positions
    that predict them (``T - 1 .. T + M - 2``, a static slice: nothing recompiles) and the LM head
    and the log-softmax run chunk by chunk on those (``hidden_token_logprobs``, the banned ids at
    ``-inf`` inside each chunk); no ``[B, T + M, V]`` logits exist, forward or backward.
    """
    inputs = batch.sequences[:, :-1]
    num_new = batch.response_mask.shape[1]
    # position t predicts token t + 1
    positions = jnp.broadcast_to(batch.prompt_length - 1 + jnp.arange(num_new, dtype=jnp.int32),
                                 batch.response_mask.shape)
    out = model(inputs, pixel_values=batch.pixel_values,
                attention_mask=batch.attention_mask[:, :-1], output_positions=positions,
                return_logits=False)
    return logprobs.hidden_token_logprobs(
        out.last_hidden_state, model.language_model.lm_head_table(), batch.new_tokens,
        batch.response_mask, chunk_size=chunk_size, banned_token_ids=banned_token_ids)


def _merge(graphdef: Any, *states: Any) -> nnx.Module:
    # Fresh Variables at this trace level, as engine.step does.
    return nnx.merge(graphdef, *(jax.tree.map(lambda x: x, s) for s in states))


def make_rollout_scorer(graphdef: Any, *, reference_mode: str, reference_graphdef: Any = None):
    """``score(trainable, frozen, reference, batch, banned) -> (old [B, M], ref [B, M])``,
    jitted: the sampling policy's and the reference's log-probs of the samples.

    ``reference_mode``: "copy" (``reference`` is the frozen copy's state) or "lora_base" (the
    policy with its adapters off; ``reference`` is None).
    """
    if reference_mode not in reference_lib.ON_POLICY_MODES:
        raise ValueError(f"FiSAO's reference.mode={reference_mode!r}; valid: "
                         f"{reference_lib.ON_POLICY_MODES}")

    @jax.jit
    def score(trainable, frozen, reference_state, batch, banned):
        policy = _merge(graphdef, trainable, frozen)
        reference = reference_lib.reference_model(reference_mode, policy, reference_graphdef,
                                                  reference_state)
        old = response_token_logps(policy, batch, banned)
        ref = response_token_logps(reference, batch, banned)
        return old, jax.lax.stop_gradient(ref)

    return score


def make_ppo_update(graphdef: Any, method_config: Mapping[str, Any],
                    tx: optax.GradientTransformation):
    """``update(trainable, opt_state, frozen, batch, fixed, banned) -> (trainable, opt_state,
    metrics)``, jitted with ``trainable`` and ``opt_state`` donated.

    ``fixed`` holds the scored arrays that do not change over the epochs on a batch
    (``fixed_scores``); the update adds the policy's ``token_logps(POLICY, SAMPLE)`` and reads
    ``registry.compute_objective`` through ``step.masked_objective``. The loss is the mean over
    the batch's samples.
    """
    method_config = dict(method_config)
    if "fisao_ppo" not in registry.active_terms(method_config):
        raise ValueError(f"the FiSAO loop trains the fisao_ppo term; method "
                         f"{method_config.get('name')!r} runs {registry.active_terms(method_config)}")

    def loss_fn(trainable, frozen, batch, fixed, banned):
        policy = _merge(graphdef, trainable, frozen)
        scored = {**fixed, terms_lib.token_logps(terms_lib.POLICY, SAMPLE):
                  response_token_logps(policy, batch, banned)}
        loss_sum, metrics = masked_objective(method_config, scored, batch.example_mask)
        count = jnp.maximum(jnp.sum(batch.example_mask), 1.0)
        return loss_sum / count, metrics

    def update(trainable, opt_state, frozen, batch, fixed, banned):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, frozen, batch, fixed, banned)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = dict(metrics)
        metrics["optim/grad_norm"] = (optax.tree.norm(grads), jnp.asarray(1.0, jnp.float32))
        return trainable, opt_state, metrics

    return jax.jit(update, donate_argnums=(0, 1))


def fixed_scores(batch: RolloutBatch, token_rewards: jax.Array, old: jax.Array,
                 ref: jax.Array) -> dict[terms_lib.Score, jax.Array]:
    """The scored arrays of ``make_ppo_update`` that stay fixed over a batch's epochs: every
    ``objectives.fisao.PPO_READS`` but the policy's log-probs (``[B, M]``; group ids ``[B]``)."""
    _, sampler, reference, rewards, response_mask, group_ids = PPO_READS
    return {sampler: old, reference: ref, rewards: token_rewards,
            response_mask: batch.response_mask, group_ids: batch.group_ids}


# ----------------------------------------------------------------------------- data


def prompt_indices(step: int, count: int, num_records: int, *, seed: int,
                   shuffle: bool = True) -> np.ndarray:
    """The records of rollout step ``step``: positions ``step * count ..`` of the endless sequence
    of per-epoch permutations (``default_rng([seed, epoch])``; identity without ``shuffle``)."""
    if num_records < 1:
        raise ValueError("the prompt source is empty")
    positions = np.arange(step * count, (step + 1) * count)
    epochs, offsets = np.divmod(positions, num_records)
    orders = {int(e): (np.random.default_rng([seed, int(e)]).permutation(num_records) if shuffle
                       else np.arange(num_records)) for e in np.unique(epochs)}
    return np.asarray([orders[int(e)][o] for e, o in zip(epochs, offsets)])


def _expand(path: str) -> pathlib.Path:
    return pathlib.Path(os.path.expanduser(path))


def _records(source: Sequence[Any], indices: Sequence[int]) -> list[Mapping[str, Any]]:
    return [source[int(i)] for i in indices]


def _on_mesh(tree: Any, mesh: Mesh, rules: Any) -> Any:
    """Host arrays -> device arrays sharded over the batch axes (single process)."""
    return jax.tree.map(lambda x: jax.device_put(
        np.asarray(x), sharding.batch_sharding(mesh, np.ndim(x), rules)), tree)


# ----------------------------------------------------------------------------- verifier, calibration


def _sft_split(config: Any) -> Any:
    data = config.data
    return load_split(data.dataset, "sft", data_dir=_expand(data.data_dir),
                      **data.builder.to_dict())


def _holdout(num_records: int) -> int:
    return min(VERIFIER_HOLDOUT, num_records // 4)


def shapes_world_verifier(config: Any, vocabulary: ObjectVocabulary,
                          image_config: ImageProcessorConfig, *,
                          spec: WordClipSpec | None = None) -> tuple[Verifier, Sequence[Any]]:
    """The cached word-level CLIP of the shapes world's ``sft`` split, and the held-out tail of
    that split (the records it never trained on)."""
    sft = _sft_split(config)
    spec = spec or WordClipSpec(holdout=_holdout(len(sft)))
    key = {"dataset": config.data.dataset, "split": "sft", "world": config.data.builder.to_dict(),
           "num_records": len(sft)}
    verifier, _ = verifier_lib.cached_word_clip(
        _expand(config.data.data_dir) / "fisao_verifier", key, sft, vocabulary.objects,
        vocabulary.truth, image_config=image_config, spec=spec)
    return verifier, [sft[i] for i in range(len(sft) - spec.holdout, len(sft))]


def calibration_records(records: Sequence[Mapping[str, Any]], limit: int = CALIBRATION_RECORDS
                        ) -> list[Mapping[str, Any]]:
    """Up to ``limit`` shapes-world caption records (the prompt FiSAO trains on) of ``records``."""
    return [r for r in records if r["prompt"] == shapes_world.CAPTION_PROMPT][:limit]


def policy_calibration(config: Any, model: Llava, tokenizer: Any, verifier: Verifier,
                       vocabulary: ObjectVocabulary, records: Sequence[Mapping[str, Any]], *,
                       image_config: ImageProcessorConfig, cache_dir: pathlib.Path
                       ) -> Calibration:
    """``pipelines.fisao.calibrate_policy`` of the initial policy, cached under ``cache_dir``."""
    rollout = config.rollout
    # The training batch's shape, so that sampling compiles once for calibration and training;
    # records beyond a whole number of batches are left out.
    prompts_per_batch = int(config.data.batch_size) // int(rollout.num_samples)
    if len(records) >= prompts_per_batch:
        records = records[:len(records) - len(records) % prompts_per_batch]
    settings = dict(num_samples=int(rollout.num_samples),
                    max_new_tokens=int(rollout.max_new_tokens),
                    temperature=float(rollout.temperature), prompts_per_batch=prompts_per_batch,
                    seed=int(config.seed))
    key = rollouts.calibration_key(
        verifier=reference_cache.params_digest(nnx.state(verifier.model, nnx.Param)),
        policy=reference_cache.params_digest(nnx.state(model, nnx.Param)),
        tokenizer=reference_cache.tokenizer_digest(tokenizer), vocabulary=vocabulary.name,
        records=[(r.get("id"), r["prompt"], r["objects"]) for r in records], **settings)
    return rollouts.cached_calibration(cache_dir, key, lambda: rollouts.calibrate_policy(
        model, tokenizer, verifier, vocabulary, records, image_config=image_config, **settings))


# ----------------------------------------------------------------------------- the loop


def _verifier_and_calibration(config: Any, model: Llava, tokenizer: Any,
                              vocabulary: ObjectVocabulary, image_config: ImageProcessorConfig, *,
                              workdir: pathlib.Path, verifier: Verifier | None,
                              calibration: Calibration | None,
                              calibration_split: Sequence[Mapping[str, Any]] | None,
                              verifier_spec: WordClipSpec | None
                              ) -> tuple[Verifier, Calibration, dict[str, Any]]:
    """``train_fisao``'s verifier and calibration (see its Args), and what to report of them."""
    shapes = config.data.dataset == SHAPES_WORLD
    report: dict[str, Any] = {}
    holdout = None
    if verifier is None:
        if not shapes:
            raise ValueError(f"dataset {config.data.dataset!r}: pass verifier="
                             "Verifier.from_hf_clip(<the CLIP of the vision tower>)")
        verifier, holdout = shapes_world_verifier(config, vocabulary, image_config,
                                                  spec=verifier_spec)
        report["verifier_discrimination"] = verifier_lib.discrimination(
            verifier, holdout, vocabulary.objects, vocabulary.truth)
        logger.info("FiSAO verifier on %d held-out images: %s", len(holdout),
                    report["verifier_discrimination"])
    if calibration is None:
        if calibration_split is not None:
            records, cache_dir = list(calibration_split), workdir / "calibration"
        elif shapes:
            if holdout is None:
                sft = _sft_split(config)
                holdout = [sft[i] for i in range(len(sft) - _holdout(len(sft)), len(sft))]
            records = calibration_records(holdout)
            cache_dir = _expand(config.data.data_dir) / "fisao_calibration"
        else:
            raise ValueError("pass calibration=Calibration(...) or calibration_split= records "
                             "with ground-truth objects")
        calibration = policy_calibration(config, model, tokenizer, verifier, vocabulary, records,
                                         image_config=image_config, cache_dir=cache_dir)
    report["calibration"] = dataclasses.asdict(calibration)
    logger.info("FiSAO calibration: %s", report["calibration"])
    return verifier, calibration, report


def train_fisao(config: Any, *, model: Llava, tokenizer: Any, source: Sequence[Any],
                image_config: ImageProcessorConfig, workdir: str | os.PathLike | None = None,
                verifier: Verifier | None = None, calibration: Calibration | None = None,
                calibration_split: Sequence[Mapping[str, Any]] | None = None,
                verifier_spec: WordClipSpec | None = None,
                stop_at: int | None = None) -> TrainResult:
    """Runs FiSAO from ``model`` (see the module doc); the caller's ``model`` is untouched.

    Args:
      config: a validated config with a ``rollout`` section (``configs/fisao.py``).
      model: the initial policy; the reference is a frozen copy of it (or its LoRA base).
      tokenizer, image_config: the policy's.
      source: the prompt records ("image" uint8 ``[H, W, 3]``, "prompt"), e.g. the shapes world's
        ``preference`` split.
      workdir: overrides ``config.workdir``.
      verifier: the CLIP verifier; None on the shapes world builds (or loads) the cached word
        CLIP (``verifier_spec`` overrides its ``WordClipSpec``); required on other datasets
        (``Verifier.from_hf_clip``).
      calibration: ``(mu_c, mu_h)`` to use as given; None calibrates the initial policy (cached)
        on ``calibration_split`` (records with "image", "prompt", "objects") or, on the shapes
        world, on the ``sft`` tail the verifier did not train on.
      stop_at: leave after this rollout step (checkpointed), as a pre-empted run would.

    Returns:
      ``training.loop.TrainResult`` (``steps`` = rollout steps run).
    """
    config_checks.validate(config, device_count=jax.device_count())
    if jax.process_count() > 1:  # rollouts are sampled and scored with host arrays
        raise NotImplementedError(
            f"FiSAO runs in one process; this job has {jax.process_count()} (run it on one "
            "host with --config.distributed.mode=off)")
    workdir = pathlib.Path(workdir) if workdir is not None else _expand(
        config.workdir or f"runs/{config.name}")
    workdir.mkdir(parents=True, exist_ok=True)
    rollout = config.rollout
    method = config.method.to_dict()
    vocabulary = rollouts.object_vocabulary(rollout.vocabulary)
    num_samples, ppo_epochs = int(rollout.num_samples), int(rollout.ppo_epochs)
    num_prompts = int(config.data.batch_size) // num_samples
    num_steps = int(config.train.num_steps)

    verifier, calibration, report = _verifier_and_calibration(
        config, model, tokenizer, vocabulary, image_config, workdir=workdir, verifier=verifier,
        calibration=calibration, calibration_split=calibration_split,
        verifier_spec=verifier_spec)
    (workdir / "fisao.json").write_text(json.dumps(report, indent=2))

    mesh = sharding.make_mesh(dict(config.mesh))
    rules = tuple(tuple(r) for r in config.mesh_rules)
    policy = state_lib.prepare_policy(state_lib.copy_model(model), config.model,
                                      seed=int(config.seed))
    policy.eval()  # [our choice] no dropout in FiSAO (module doc)
    reference_graphdef, reference_state = (
        (None, None) if config.reference.mode == "lora_base"
        else reference_lib.placed_copy(policy, mesh, rules))
    split = state_lib.split_policy(policy, config.model)
    trainable, frozen = loop.place_policy(split, mesh, rules)
    num_updates = num_steps * ppo_epochs
    tx = optimizer_lib.make_optimizer(config.optimizer, num_updates)
    schedule = optimizer_lib.learning_rate_schedule(config.optimizer, num_updates)
    opt_state = optimizer_lib.init_opt_state(tx, trainable, mesh)
    ckpt, trainable, opt_state, rng, start = loop.open_and_resume(
        config, workdir, trainable, opt_state, jax.random.key(int(config.seed)))

    score = make_rollout_scorer(split.graphdef, reference_mode=config.reference.mode,
                                reference_graphdef=reference_graphdef)
    update = make_ppo_update(split.graphdef, method, tx)
    banned = jnp.asarray([model.config.image_token_id], jnp.int32)
    object_embeds = verifier.object_embeddings(vocabulary.objects)
    mu = (jnp.float32(calibration.mu_c), jnp.float32(calibration.mu_h))
    metadata = {"config": config.to_dict(), "method": method,
                "calibration": dataclasses.asdict(calibration)}
    with loop.open_metric_log(config, workdir, num_steps=num_steps, start=start) as metric_log:
        end = num_steps if stop_at is None else min(int(stop_at), num_steps)
        for step in range(start, end):
            logger.debug("FiSAO rollout step %d", step + 1)
            records = _records(source, prompt_indices(
                step, num_prompts, len(source), seed=int(config.seed),
                shuffle=bool(config.data.shuffle)))
            images = [r["image"] for r in records]
            batch, lengths = rollouts.sample_rollouts(
                nnx.merge(split.graphdef, trainable, frozen), tokenizer, images,
                [r["prompt"] for r in records], image_config=image_config,
                num_samples=num_samples, max_new_tokens=int(rollout.max_new_tokens),
                temperature=float(rollout.temperature), rng=jax.random.fold_in(rng, step))
            words, _ = rollouts.find_object_words(tokenizer, np.asarray(batch.new_tokens),
                                                  lengths, vocabulary)
            image_embeds = jnp.repeat(verifier.image_embeddings(verifier.pixels(images)),
                                      num_samples, axis=0)
            token_rewards, _, rollout_metrics = rollouts.rollout_rewards(
                image_embeds, object_embeds, words, jnp.asarray(batch.response_mask), *mu,
                reward_granularity=str(rollout.reward_granularity))
            batch, token_rewards = _on_mesh((batch, token_rewards), mesh, rules)
            old, ref = score(trainable, frozen, reference_state, batch, banned)
            fixed = fixed_scores(batch, token_rewards, old, ref)
            metrics: dict[str, Metric] = {}
            for _ in range(ppo_epochs):
                trainable, opt_state, epoch_metrics = update(trainable, opt_state, frozen, batch,
                                                             fixed, banned)
                metrics = accumulate(metrics, epoch_metrics) if metrics else dict(epoch_metrics)
            metrics.update(rollout_metrics)
            # 0 up to float error at temperature 1: the scorer reads the tokens as sampled.
            metrics["rollout/sampler_logp_gap"] = mean_metric(
                jnp.abs(old - batch.sampler_logps), batch.response_mask)
            metrics["optim/learning_rate"] = float(schedule((step + 1) * ppo_epochs - 1))
            metric_log.log(step + 1, metrics, examples=len(lengths))
            ckpt.save(step + 1, params=trainable, opt_state=opt_state, rng=rng,
                      metadata=metadata)
        logger.debug("FiSAO rollout steps %d..%d done", start + 1, end)
        return loop.finish_run(config, ckpt=ckpt, metric_log=metric_log, end=end, split=split,
                               trainable=trainable, opt_state=opt_state, frozen=frozen, rng=rng,
                               workdir=workdir, metadata=metadata, tokenizer=tokenizer,
                               image_config=image_config)
