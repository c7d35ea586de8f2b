"""From a batch to the scored arrays an objective reads: which forwards, on which images.

``objectives.registry.required_scores(method)`` lists every ``Score`` a method's loss reads
(``token_logps(POLICY, CHOSEN)``, ``token_weights(CHOSEN_CORRUPT)`` ...). ``plan_scoring`` turns
them into a ``ScoringPlan``: which responses the policy and the reference read, which need token
KL or token weights, which images and batch values the step uses, and so which pipeline extras
and record fields the method needs (``data.fields``). ``score_batch`` then runs, inside the
jitted step:

1. the vision tower **once** over every distinct image the plan needs (original, corrupted,
   noised, focus-augmented ...), stacked into one call; when the tower is frozen its features are
   shared by policy and reference, which apply their own projectors (identical unless the
   projector trains);
2. for the enhanced image only: a reference forward on the chosen response with every layer's
   image probes, whose first ``anchor_steps`` response positions give ADAPT's visual anchor, the
   refined mask and ``I_VE`` (encoded as one more image);
3. one policy forward over all its rows concatenated along the batch (``[R*B, T]``: every token
   group of a batch shares one bucket length), and one reference forward over its rows (no
   gradient; image probes of the Cat-PO layer band when Cat-PO weights are configured). A row is
   a (token group, image) pair: responses that read the same tokens on the same image (P2-DPO's
   ``focus_chosen`` and DPO's ``chosen``) share one;
4. per-token log-probs, token KL and token weights from those outputs.

Positions follow ``data.batch.shift_for_next_token``: position ``t`` predicts token ``t + 1``.
**[our choice]** Cat-PO's per-token signals of response token ``y`` use the attention row of the
query that *generates* ``y`` (position ``t`` for label ``t + 1``, as at decoding time) and the
input embedding of ``y`` itself; the EOS label is the special token with weight 1.0.
**[our choice]** ADAPT's anchor is taken under teacher forcing: the reference reads the chosen
response, and the attention of the queries generating its first ``K`` tokens stands in for the
first ``K`` decoding steps (a response shorter than ``K`` repeats its last position).

Logits only where a loss reads them: each forward is kept at its rows' response positions
(``engine.kept_positions``, which records the **[our choice]** of their static number,
``P = T - N_img``): the final norm, the last layer's queries and MLP, the probes and, chunk by
chunk, the LM head and log-softmax run there only; the responses needing token KL get both models'
log-probs and the KL in one pass; TPO's label logits are dot products with the label's LM-head
column; Cat-PO's weights are computed on the kept positions (all its signals are per token, its
min-max ranges and top-k ranking read response tokens only, kept in order). Every score is
scattered back to ``[B, T]``, so what ``score_batch`` returns is unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmpo_jax.data import fields, interventions
from mmpo_jax.data.batch import Batch, SftBatch, shift_for_next_token, token_field
from mmpo_jax.data.fields import ENHANCED, IMAGE_KINDS, ORIGINAL, TOKEN_GROUPS
from mmpo_jax.data.image_processing import ImageProcessorConfig
from mmpo_jax.engine import kept_positions as kept
from mmpo_jax.engine.kept_positions import KeptRead
from mmpo_jax.models.attention import ProbeSpec
from mmpo_jax.models.llava import Llava
from mmpo_jax.objectives import logprobs, registry
from mmpo_jax.objectives import terms as terms_lib
from mmpo_jax.objectives.terms import CHOSEN, POLICY, REFERENCE, SAMPLER, Response, Score
from mmpo_jax.objectives.tpo import tpo_token_weights
from mmpo_jax.rewards import adapt as adapt_rewards
from mmpo_jax.rewards import catpo as catpo_rewards

Scored = dict[Score, jax.Array]


@dataclasses.dataclass(frozen=True)
class ScoringPlan:
    """What one step computes, derived from a method config (see the module doc).

    Attributes:
      policy: responses whose policy log-probs are read (with gradient).
      reference: responses whose reference log-probs are read.
      token_kl: responses needing the per-position KL between policy and reference.
      weighted: responses needing the configured weighting's token weights.
      weighting: that weighting's name (``objectives.registry.weightings``), or None.
      masks: responses whose masks are read.
      example_values: per-example batch fields read (``data.fields.EXAMPLE_VALUES``).
      options: the method's resolved options (``registry.resolve_options``).
    """

    policy: tuple[Response, ...]
    reference: tuple[Response, ...] = ()
    token_kl: tuple[Response, ...] = ()
    weighted: tuple[Response, ...] = ()
    weighting: str | None = None
    masks: tuple[Response, ...] = ()
    example_values: tuple[str, ...] = ()
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def rereads(self) -> tuple[Response, ...]:
        """The weighting's re-reads: each weighted response on another image (TPO's noise)."""
        image = registry.weightings()[self.weighting].reread_on if self.weighting else None
        if image is None:
            return ()
        return tuple(Response(f"{r.name}@{image}", r.tokens, image) for r in self.weighted)

    @property
    def policy_rows(self) -> tuple[Response, ...]:
        """Responses of the policy forward (the KL needs both models' logits)."""
        return tuple(dict.fromkeys(self.policy + self.token_kl))

    @property
    def reference_rows(self) -> tuple[Response, ...]:
        """Responses of the reference forward: its reads, the KL's, the weights', re-reads."""
        return tuple(dict.fromkeys(self.reference + self.token_kl + self.weighted + self.rereads))

    @property
    def images(self) -> tuple[str, ...]:
        """Image kinds the step encodes, sorted, with the derived (enhanced) image last."""
        kinds = {r.image for r in self.policy_rows + self.reference_rows}
        if ENHANCED in kinds:
            kinds.add(ORIGINAL)  # the anchor is read on the original image
        return tuple(sorted(kinds - {ENHANCED})) + ((ENHANCED,) if ENHANCED in kinds else ())

    @property
    def needs_anchor(self) -> bool:
        return ENHANCED in self.images

    @property
    def per_epoch_images(self) -> tuple[str, ...]:
        """Image kinds drawn anew every epoch (a one-epoch reference cache cannot hold them)."""
        return tuple(kind for kind in self.images if IMAGE_KINDS[kind].per_epoch)

    @property
    def reference_outputs(self) -> tuple[Score, ...]:
        """What the reference part produces (and a precomputed cache stores)."""
        return (tuple(terms_lib.token_logps(REFERENCE, r) for r in self.reference)
                + tuple(terms_lib.token_weights(r) for r in self.weighted))

    @property
    def token_groups(self) -> tuple[str, ...]:
        responses = self.policy_rows + self.reference_rows + self.masks
        return tuple(sorted({r.tokens for r in responses}))

    @property
    def pipeline_extras(self) -> tuple[str, ...]:
        """The ``preference_pipeline`` extras whose batch fields this plan reads, sorted."""
        extras = {IMAGE_KINDS[kind].extra for kind in self.images}
        extras.update(TOKEN_GROUPS[group].extra for group in self.token_groups)
        extras.update(fields.EXAMPLE_VALUES[name] for name in self.example_values)
        return tuple(sorted(extras - {None}))

    @property
    def record_fields(self) -> tuple[str, ...]:
        """Record fields of the training split the plan's batches are made from, sorted."""
        needed = {"image", "prompt", *self.example_values}
        needed.update(TOKEN_GROUPS[group].record_field for group in self.token_groups)
        for kind in self.images:
            needed.update(IMAGE_KINDS[kind].record_fields)
        return tuple(sorted(needed - {None}))


def plan_scoring(method_config: Mapping[str, Any]) -> ScoringPlan:
    """The ``ScoringPlan`` of a method block (``objectives.registry``'s config format).

    Raises:
      NotImplementedError: for responses sampled on-policy (FiSAO's rollouts), which come from
        the on-policy loop, not from a preference batch.
      ValueError: an example value that is not a batch field, or a weighting the engine cannot
        compute.
    """
    reads: dict[str, list] = {kind: [] for kind in (
        terms_lib.TOKEN_KL, terms_lib.TOKEN_WEIGHTS, terms_lib.MASK, terms_lib.EXAMPLE_VALUE)}
    policy, reference = [], []
    scores = registry.required_scores(method_config)
    sampled = [s.key for s in scores if s.response.from_rollouts or s.model == SAMPLER]
    if sampled:
        raise NotImplementedError(
            f"method {method_config.get('name')!r} needs on-policy rollouts ({sampled}); they "
            "come from the on-policy loop (training.fisao_loop), not a preference batch")
    for score in scores:
        if score.kind == terms_lib.TOKEN_LOGPS:
            (policy if score.model == POLICY else reference).append(score.response)
        elif score.kind == terms_lib.EXAMPLE_VALUE:
            if score.name not in fields.EXAMPLE_VALUES:
                raise ValueError(f"{score.key!r} is not a per-example batch field; known: "
                                 f"{sorted(fields.EXAMPLE_VALUES)}")
            reads[score.kind].append(score.name)
        elif score.kind in reads:
            reads[score.kind].append(score.response)
        else:
            raise ValueError(f"{score.key!r}: a preference batch has no {score.kind}")
    weighting = registry.token_weighting(method_config)
    if weighting is not None and weighting.name not in WEIGHT_PROVIDERS:
        raise ValueError(f"token weighting {weighting.name!r} has no engine implementation; "
                         f"known: {sorted(WEIGHT_PROVIDERS)}")
    return ScoringPlan(
        policy=tuple(policy), reference=tuple(reference), token_kl=tuple(reads[terms_lib.TOKEN_KL]),
        weighted=tuple(reads[terms_lib.TOKEN_WEIGHTS]),
        weighting=None if weighting is None else weighting.name,
        masks=tuple(reads[terms_lib.MASK]), example_values=tuple(reads[terms_lib.EXAMPLE_VALUE]),
        options=registry.resolve_options(method_config))


def batch_tokens(batch: Batch | SftBatch, group: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(input_ids, loss_mask, attention_mask)`` of a token group; an ``SftBatch``'s one group
    stands for ``chosen``."""
    if isinstance(batch, SftBatch):
        if group != "chosen":
            raise ValueError(f"an SftBatch has only the chosen response, not {group!r}")
        group = ""
    values = [getattr(batch, token_field(group, s), None)
              for s in ("input_ids", "loss_mask", "attention_mask")]
    if any(v is None for v in values):
        raise ValueError(f"the batch has no token group {group!r}; was the pipeline built with "
                         "the extras this method needs?")
    return tuple(values)


def response_mask(batch: Batch | SftBatch, response: Response) -> jax.Array:
    """``[B, T]`` int32: 1 at the positions predicting ``response``'s tokens."""
    input_ids, loss_mask, _ = batch_tokens(batch, response.tokens)
    return shift_for_next_token(input_ids, loss_mask)[2]


def _row(response: Response) -> tuple[str, str]:
    return response.tokens, response.image


@dataclasses.dataclass(frozen=True)
class _Rows:
    """Shifted tokens of several (token group, image) rows stacked along the batch: ``[R*B, T]``."""

    keys: tuple[tuple[str, str], ...]
    inputs: jax.Array
    labels: jax.Array
    mask: jax.Array
    attention_mask: jax.Array

    def split(self, array: jax.Array) -> dict[tuple[str, str], jax.Array]:
        return dict(zip(self.keys, jnp.split(array, len(self.keys), axis=0)))

    def of(self, array: jax.Array, responses: tuple[Response, ...]) -> dict[Response, jax.Array]:
        """``array`` ``[R*B, ...]`` cut into each response's ``[B, ...]``."""
        parts = self.split(array)
        return {r: parts[_row(r)] for r in responses}


def _stack_rows(batch: Batch | SftBatch, responses: tuple[Response, ...]) -> _Rows:
    keys = tuple(dict.fromkeys(_row(r) for r in responses))
    parts = []
    for tokens, _ in keys:
        input_ids, loss_mask, attention_mask = batch_tokens(batch, tokens)
        inputs, labels, mask = shift_for_next_token(input_ids, loss_mask)
        parts.append((inputs, labels, mask, jnp.asarray(attention_mask, jnp.int32)))
    stacked = [jnp.concatenate(arrays, axis=0) for arrays in zip(*parts)]
    return _Rows(keys, *stacked)


def _positions(attention_mask: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def _forward(model: Llava, rows: _Rows, visual: Mapping[str, jax.Array],
             probe: ProbeSpec | None = None, output_positions: jax.Array | None = None):
    """The model over ``rows``, without the LM head (``last_hidden_state`` and probes at
    ``output_positions [R*B, P]`` when given)."""
    # [sum_rows B*K, N, D]: the model scatters them over the rows' placeholders in order
    tokens = jnp.concatenate([visual[image] for _, image in rows.keys], axis=0)
    return model(rows.inputs, visual_tokens=tokens, attention_mask=rows.attention_mask,
                 positions=_positions(rows.attention_mask), probe=probe,
                 output_positions=output_positions, return_logits=False)


def _read(model: Llava, rows: _Rows, visual: Mapping[str, jax.Array],
          probe: ProbeSpec | None = None, *, frozen: bool = False) -> KeptRead:
    """``_forward`` kept at ``P = T - N_img`` response positions per row (the module doc);
    ``frozen``: no gradient flows into the model's outputs (the reference)."""
    num_image_tokens = min(visual[image].shape[1] for _, image in rows.keys)
    positions, valid = logprobs.response_positions(
        rows.mask, kept.num_kept_positions(rows.mask.shape[1], num_image_tokens))
    out = _forward(model, rows, visual, probe, output_positions=positions)
    head = model.language_model.lm_head_table()
    if frozen:
        out, head = jax.lax.stop_gradient((out, head))
    labels = logprobs.gather_positions(rows.labels, positions)
    return KeptRead(rows, positions, valid, labels, out.last_hidden_state, out.probes, head)


def _keys(responses: tuple[Response, ...]) -> tuple[tuple[str, str], ...]:
    return tuple(dict.fromkeys(_row(r) for r in responses))


def enhancement_mask(reference: Llava, batch: Batch, visual: Mapping[str, jax.Array], *,
                     anchor_steps: int, threshold_percentile: float | None) -> jax.Array:
    """ADAPT's refined mask of every example upsampled to the image: ``[B, H, W]`` in [0, 1].

    The reference reads the chosen response on the original image with every layer's image
    probes; the queries generating the first ``anchor_steps`` response tokens give
    ``[B, L, K, N_img]``, whose visual anchor and refined mask (METHODS.md §4) are upsampled
    bicubically to the image.
    """
    rows = _stack_rows(batch, (CHOSEN,))
    layers = tuple(range(reference.config.text_config.num_hidden_layers))
    out = _forward(reference, rows, visual, ProbeSpec(layers, "image"))
    order = jnp.cumsum(rows.mask, axis=-1)  # k-th response token has order k (1-based)
    count = order[:, -1:]
    wanted = jnp.minimum(jnp.arange(1, anchor_steps + 1)[None, :], jnp.maximum(count, 1))
    positions = jax.vmap(jnp.searchsorted)(order, wanted)  # [B, K]
    history = jnp.stack(
        [jnp.take_along_axis(out.probes[layer], positions[..., None], axis=1) for layer in layers],
        axis=1)  # [B, L, K, N_img]
    anchor = adapt_rewards.visual_anchor(jax.lax.stop_gradient(history))
    grid_mask = adapt_rewards.refined_mask(anchor, threshold_percentile=threshold_percentile)
    return interventions.upsample_mask(grid_mask, tuple(batch.pixel_values.shape[1:3]))


def enhanced_images(reference: Llava, batch: Batch, visual: Mapping[str, jax.Array],
                    image_config: ImageProcessorConfig, *, anchor_steps: int,
                    threshold_percentile: float | None) -> jax.Array:
    """ADAPT's ``I_VE`` of every example, normalised like ``pixel_values``: ``[B, H, W, 3]``.

    ``I*m + white*(1-m)`` with ``m = enhancement_mask(...)``, applied in normalised units: white
    is ``(1 - mean) / std``.
    """
    pixel_mask = enhancement_mask(reference, batch, visual, anchor_steps=anchor_steps,
                                  threshold_percentile=threshold_percentile)
    mean, std = jnp.asarray(image_config.mean), jnp.asarray(image_config.std)
    return interventions.visually_enhance(batch.pixel_values, pixel_mask, white=(1.0 - mean) / std)


def _encode(policy: Llava, reference: Llava | None, pixel_values: jax.Array, *,
            vision_frozen: bool) -> tuple[jax.Array, jax.Array | None]:
    """Policy and reference visual tokens of ``[N, H, W, 3]``; the tower runs once when frozen."""
    with jax.named_scope("vision"):
        features = policy.image_features(pixel_values)
        if vision_frozen:
            features = jax.lax.stop_gradient(features)
        ref_features = None
        if reference is not None:
            ref_features = features if vision_frozen else reference.image_features(pixel_values)
    with jax.named_scope("projector"):
        policy_tokens = policy.multi_modal_projector(features)
        if reference is None:
            return policy_tokens, None
        return policy_tokens, jax.lax.stop_gradient(reference.multi_modal_projector(ref_features))


def _images(plan: ScoringPlan, policy: Llava, reference: Llava | None, batch: Batch | SftBatch,
            image_config: ImageProcessorConfig, vision_frozen: bool
            ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """``(policy, reference)`` visual tokens ``[B*K, N, D]`` by image kind (K images per example,
    example-major: the order a row's placeholders consume them; reference: {} if None)."""
    kinds = tuple(kind for kind in plan.images if IMAGE_KINDS[kind].field is not None)
    pixels = [getattr(batch, IMAGE_KINDS[k].field) for k in kinds]
    pixels = [p.reshape((-1,) + p.shape[-3:]) for p in pixels]  # [B, K, H, W, 3] -> [B*K, ...]
    cuts = np.cumsum([p.shape[0] for p in pixels])[:-1].tolist()
    policy_tokens, ref_tokens = _encode(policy, reference, jnp.concatenate(pixels, axis=0),
                                        vision_frozen=vision_frozen)
    policy_visual = dict(zip(kinds, jnp.split(policy_tokens, cuts, axis=0)))
    ref_visual = {} if reference is None else dict(zip(kinds, jnp.split(ref_tokens, cuts)))
    if plan.needs_anchor:
        if reference is None:
            raise ValueError("the enhanced image is made from the reference's attention; there "
                             "is no reference model")
        threshold = plan.options["mask_threshold_percentile"]
        with jax.named_scope("enhanced_image"):
            enhanced = enhanced_images(reference, batch, ref_visual, image_config,
                                       anchor_steps=plan.options["anchor_steps"],
                                       threshold_percentile=threshold or None)
            policy_visual[ENHANCED], ref_visual[ENHANCED] = _encode(
                policy, reference, jax.lax.stop_gradient(enhanced), vision_frozen=vision_frozen)
    return policy_visual, ref_visual


def _preferred(response: Response) -> bool:
    return bool(TOKEN_GROUPS[response.tokens].preferred)


def _catpo_weights(plan: ScoringPlan, reference: Llava, read: KeptRead, visual,
                   eos_token_id: int) -> Scored:
    """Computed at the kept positions: every Cat-PO signal is per token, and the min-max ranges
    and the top-k ranking (ties by position) read the response tokens only, kept in order."""
    band = catpo_rewards.layer_band(reference.config.text_config.num_hidden_layers,
                                    tuple(plan.options["layer_band"]))
    attention = read.of(jnp.mean(jnp.stack([read.probes[layer] for layer in band]), axis=0),
                        plan.weighted)
    labels, mask = read.of(read.labels, plan.weighted), read.of(read.valid, plan.weighted)
    embed = reference.language_model.model.embed_tokens
    top_k = plan.options["top_k_percent"]
    return {terms_lib.token_weights(r): read.unkeep(catpo_rewards.token_weights(
        jax.lax.stop_gradient(attention[r]), jax.lax.stop_gradient(embed(labels[r])),
        visual[r.image], mask[r], chosen=_preferred(r), alpha=plan.options["alpha"],
        lambda_ref=plan.options["lambda_ref"], normalize=plan.options["normalize"],
        special_token_mask=labels[r] == eos_token_id, top_k_percent=top_k if top_k else None),
        _row(r)) for r in plan.weighted}


def _tpo_weights(plan: ScoringPlan, reference: Llava, read: KeptRead, visual,
                 eos_token_id: int) -> Scored:
    del reference, visual, eos_token_id
    both = plan.weighted + plan.rereads
    label_logits = read.of(kept.label_logits(read), both)
    mask = read.of(read.valid, both)
    return {terms_lib.token_weights(r): read.unkeep(tpo_token_weights(
        label_logits[r], label_logits[noisy], mask[r], chosen=_preferred(r)), _row(r))
        for r, noisy in zip(plan.weighted, plan.rereads)}


WEIGHT_PROVIDERS: dict[str, Callable[..., Scored]] = {"catpo": _catpo_weights,
                                                      "tpo": _tpo_weights}
"""Weighting name -> ``(plan, reference, reference read, visual, eos) -> {Score: [B, T]}``."""


def _reference_probe(plan: ScoringPlan, reference: Llava) -> ProbeSpec | None:
    if plan.weighting != "catpo":
        return None
    return ProbeSpec(catpo_rewards.layer_band(reference.config.text_config.num_hidden_layers,
                                              tuple(plan.options["layer_band"])), "image")


def _reference_read(plan: ScoringPlan, reference: Llava, batch: Batch | SftBatch,
                    visual: Mapping[str, jax.Array]) -> KeptRead:
    """The reference forward over its rows (no gradient), kept at their response positions."""
    rows = _stack_rows(batch, plan.reference_rows)
    with jax.named_scope("reference_forward"):
        return _read(reference, rows, visual, _reference_probe(plan, reference), frozen=True)


def _reference_part(plan: ScoringPlan, reference: Llava, read: KeptRead,
                    visual: Mapping[str, jax.Array], *, eos_token_id: int,
                    chunk_size: int | None, known: Mapping | None = None) -> Scored:
    """The reference's outputs (``plan.reference_outputs``) from its read; ``known``: log-probs
    ``{row key: [B, T]}`` already computed (with the token KL)."""
    logps = dict(known or {})
    with jax.named_scope("reference_logprobs"):
        missing = tuple(key for key in _keys(plan.reference) if key not in logps)
        logps.update(kept.token_logprobs(read, missing, chunk_size))
    scored: Scored = {terms_lib.token_logps(REFERENCE, r): logps[_row(r)] for r in plan.reference}
    if plan.weighting is not None:
        with jax.named_scope("token_weights"):
            scored.update(WEIGHT_PROVIDERS[plan.weighting](plan, reference, read, visual,
                                                           eos_token_id))
    return scored


def score_batch(plan: ScoringPlan, policy: Llava, reference: Llava | None,
                batch: Batch | SftBatch, *, image_config: ImageProcessorConfig,
                eos_token_id: int, vision_frozen: bool = True,
                cached: Mapping[str, jax.Array] | None = None,
                chunk_size: int | None = logprobs.DEFAULT_CHUNK_SIZE) -> Scored:
    """Every array the plan's method reads, for one batch (see the module doc). Call in ``jit``.

    Args:
      plan: from ``plan_scoring``.
      policy: the trained model (gradients flow through its outputs).
      reference: the frozen reference (a copy, or ``lora.without_adapters(policy)``); None when
        ``cached`` holds every ``plan.reference_outputs`` key.
      batch: the step's batch (device arrays).
      image_config: the preprocessing of ``pixel_values`` (ADAPT's white in normalised units).
      eos_token_id: Cat-PO's special token (weight 1.0).
      vision_frozen: the vision tower is not trained: encode each image once for both models.
      cached: precomputed reference outputs ``{score key: [B, T]}`` (reference mode ``cache``).

    Returns:
      ``{Score: array}``: token log-probs, masks, token KL, token weights ``[B, T]`` and example
      values ``[B]``.
    """
    cached = dict(cached or {})
    use_reference = not {s.key for s in plan.reference_outputs} <= set(cached)
    if use_reference and reference is None:
        raise ValueError(f"no reference model and no cached "
                         f"{sorted(s.key for s in plan.reference_outputs)}")
    if plan.token_kl and not use_reference:
        raise ValueError("token KL needs the reference's logits; it cannot come from a cache")
    ref_model = reference if use_reference else None
    policy_visual, ref_visual = _images(plan, policy, ref_model, batch, image_config,
                                        vision_frozen)
    policy_rows = _stack_rows(batch, plan.policy_rows)
    with jax.named_scope("policy_forward"):
        policy_read = _read(policy, policy_rows, policy_visual)
    if use_reference:
        ref_read = _reference_read(plan, ref_model, batch, ref_visual)
        # the KL's rows: both models' log-probs and the KL in one pass (scopes inside)
        policy_logps, ref_logps, kls = kept.token_logprobs_and_kl(policy_read, ref_read,
                                                                  _keys(plan.token_kl), chunk_size)
    else:
        policy_logps, ref_logps, kls = {}, {}, {}
    with jax.named_scope("policy_logprobs"):
        missing = tuple(key for key in _keys(plan.policy) if key not in policy_logps)
        policy_logps.update(kept.token_logprobs(policy_read, missing, chunk_size))
    scored: Scored = {terms_lib.token_logps(POLICY, r): policy_logps[_row(r)] for r in plan.policy}
    if use_reference:
        scored.update(_reference_part(plan, ref_model, ref_read, ref_visual,
                                      eos_token_id=eos_token_id, chunk_size=chunk_size,
                                      known=ref_logps))
        scored.update({terms_lib.token_kl(r): kls[_row(r)] for r in plan.token_kl})
    else:
        scored.update({score: jnp.asarray(cached[score.key], jnp.float32)
                       for score in plan.reference_outputs})
    scored.update({terms_lib.mask(r): response_mask(batch, r) for r in plan.masks})
    scored.update({terms_lib.example_value(name): jnp.asarray(getattr(batch, name), jnp.float32)
                   for name in plan.example_values})
    return scored


def reference_scores(plan: ScoringPlan, reference: Llava, batch: Batch, *,
                     image_config: ImageProcessorConfig, eos_token_id: int,
                     vision_frozen: bool = True,
                     chunk_size: int | None = logprobs.DEFAULT_CHUNK_SIZE) -> dict[str, jax.Array]:
    """The reference part of ``score_batch`` alone: ``{score key: [B, T]}`` of
    ``plan.reference_outputs`` (what a reference cache or a generated pair stores)."""
    del vision_frozen  # one model: its tower runs once either way
    _, visual = _images(plan, reference, reference, batch, image_config, vision_frozen=True)
    scored = _reference_part(plan, reference, _reference_read(plan, reference, batch, visual),
                             visual, eos_token_id=eos_token_id, chunk_size=chunk_size)
    return {score.key: scored[score] for score in plan.reference_outputs}
