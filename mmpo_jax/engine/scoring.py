"""From a batch to the ``scored`` arrays an objective reads: which forwards, on which images.

``objectives.registry.required_scores(method)`` names every array a method's loss reads
(``policy/chosen/token_logps``, ``ref/chosen_corrupt/token_logps``, ``chosen/token_weights`` ...).
``plan_scoring`` turns those names into a ``ScoringPlan``: which responses the policy scores, which
the reference scores, which need token KL or token weights. ``score_batch`` then runs, inside the
jitted step:

1. the vision tower **once** over every distinct image the plan needs (clean, corrupted, noised,
   focus-augmented ...), stacked into one call; when the tower is frozen its features are shared by
   policy and reference, which apply their own projectors (identical unless the projector trains);
2. ADAPT only: a reference forward on the chosen response with every layer's image probes, whose
   first ``anchor_steps`` response positions give the visual anchor, the refined mask and the
   visually-enhanced image ``I_VE`` (encoded as one more image);
3. one policy forward over all its responses concatenated along the batch (``[R*B, T]``: every
   token group of a batch shares one bucket length), and one reference forward over its responses
   (no gradient; image probes of the Cat-PO layer band when Cat-PO weights are configured);
4. per-token log-probs, token KL, Cat-PO / TPO token weights from those outputs.

The response table ``RESPONSES`` says which token group and which image each response name of the
registry stands for. Positions follow ``data.batch.shift_for_next_token``: position ``t`` predicts
token ``t + 1``. **[our choice]** Cat-PO's per-token signals of response token ``y`` use the
attention row of the query that *generates* ``y`` (position ``t`` for label ``t + 1``, as at
decoding time) and the input embedding of ``y`` itself; the EOS label is the special token with
weight 1.0. **[our choice]** ADAPT's anchor is taken under teacher forcing: the reference reads
the chosen response, and the attention of the queries generating its first ``K`` tokens stands in
for the first ``K`` decoding steps (a response shorter than ``K`` repeats its last position).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from mmpo_jax.data import interventions
from mmpo_jax.data.batch import Batch, SftBatch, shift_for_next_token, token_field
from mmpo_jax.data.image_processing import ImageProcessorConfig
from mmpo_jax.models.attention import ProbeSpec
from mmpo_jax.models.llava import Llava
from mmpo_jax.objectives import logprobs, registry
from mmpo_jax.objectives.tpo import label_token_logits, tpo_token_weights
from mmpo_jax.rewards import adapt as adapt_rewards
from mmpo_jax.rewards import catpo as catpo_rewards
from mmpo_jax.rewards.p2dpo import ddw_weights

RESPONSES: dict[str, tuple[str, str]] = {
    "chosen": ("chosen", "pixel_values"),
    "rejected": ("rejected", "pixel_values"),
    "chosen_corrupt": ("chosen", "corrupt_pixel_values"),
    "chosen_ve": ("chosen", "ve_pixel_values"),
    "rejected_noise": ("rejected", "noise_pixel_values"),
    "focus_chosen": ("chosen", "pixel_values"),
    "focus_rejected": ("rejected", "pixel_values"),
    "robust_chosen": ("robust_chosen", "noise_pixel_values"),
    "robust_rejected": ("robust_rejected", "noise_pixel_values"),
    "calib_chosen_aug": ("chosen", "focus_aug_pixel_values"),
    "calib_chosen_deg": ("chosen", "focus_deg_pixel_values"),
    "calib_rejected_aug": ("rejected", "focus_aug_pixel_values"),
    "calib_rejected_deg": ("rejected", "focus_deg_pixel_values"),
}
"""Registry response name -> (token group of the batch, image field it is scored on)."""

NOISE_SUFFIX = "@noise"
"""Reference rows of TPO weights: response ``r`` re-read on the noise image is ``r@noise``."""

DERIVED_IMAGES = ("ve_pixel_values",)
"""Images the step makes itself (ADAPT's ``I_VE``); every other image field comes with the batch."""

CATPO_DEFAULTS = {"alpha": 0.5, "lambda_ref": 0.5, "normalize": "minmax", "top_k_percent": 0.0,
                  "layer_band": (0.6, 0.7)}
ADAPT_DEFAULTS = {"anchor_steps": 5, "mask_threshold_percentile": 0.4}


@dataclasses.dataclass(frozen=True)
class ScoringPlan:
    """What one step computes, derived from a method config (see the module doc).

    Attributes:
      policy: responses the policy scores (with gradient).
      reference: responses the reference scores (token log-probs, and the rows KL/weights read).
      token_kl: responses needing the per-position KL between policy and reference.
      catpo_weights / tpo_weights: responses needing Cat-PO / TPO token weights.
      masks: responses whose ``{r}/mask`` the loss reads.
      ddw: P2-DPO's dynamic weights from the batch's CLIP scores.
      options: the method block's Cat-PO / ADAPT options with defaults filled in.
      reference_outputs: the names the reference part produces (what a precomputed cache stores).
    """

    policy: tuple[str, ...]
    reference: tuple[str, ...]
    token_kl: tuple[str, ...]
    catpo_weights: tuple[str, ...]
    tpo_weights: tuple[str, ...]
    masks: tuple[str, ...]
    ddw: bool
    options: Mapping[str, Any]

    @property
    def reference_rows(self) -> tuple[str, ...]:
        """Rows of the reference forward: its responses, then TPO's noise-image re-reads."""
        return self.reference + tuple(r + NOISE_SUFFIX for r in self.tpo_weights)

    @property
    def needs_anchor(self) -> bool:
        return any(_image_of(r) == "ve_pixel_values" for r in self.policy + self.reference_rows)

    @property
    def images(self) -> tuple[str, ...]:
        """Image fields the step encodes, in a fixed order (derived images last)."""
        names = {_image_of(r) for r in self.policy + self.reference_rows}
        if self.needs_anchor:
            names.add("pixel_values")
        batch_images = sorted(n for n in names if n not in DERIVED_IMAGES)
        return tuple(batch_images) + tuple(n for n in DERIVED_IMAGES if n in names)

    @property
    def reference_outputs(self) -> tuple[str, ...]:
        return tuple(f"ref/{r}/token_logps" for r in self.reference) + tuple(
            f"{r}/token_weights" for r in self.catpo_weights + self.tpo_weights)


def _image_of(row: str) -> str:
    response = row.removesuffix(NOISE_SUFFIX)
    if row.endswith(NOISE_SUFFIX):
        return "noise_pixel_values"
    return RESPONSES[response][1]


def _option(method_config: Mapping[str, Any], defaults: Mapping[str, Any], key: str) -> Any:
    value = method_config.get(key, defaults[key])
    return tuple(value) if isinstance(value, list) else value


def plan_scoring(method_config: Mapping[str, Any]) -> ScoringPlan:
    """The ``ScoringPlan`` of a method block (``objectives.registry``'s config format).

    Raises:
      NotImplementedError: for on-policy names (FiSAO's ``sample``/``old``), whose rollouts come
        from the on-policy loop, not from a preference batch.
      ValueError: a response name outside ``RESPONSES``.
    """
    policy, reference, kl, masks, weighted = [], [], [], [], []
    ddw = False
    for key in registry.required_scores(method_config):
        parts = key.split("/")
        if parts[0] in ("old", "sample") or (len(parts) > 1 and parts[1] == "sample"):
            raise NotImplementedError(
                f"method {method_config.get('name')!r} needs on-policy rollouts ({key}); FiSAO's "
                "sampling loop is not part of the preference trainer")
        if parts[0] == "p2dpo":
            ddw = True
            continue
        if parts[0] in ("policy", "ref"):
            response, target = parts[1], policy if parts[0] == "policy" else reference
        else:
            response, target = parts[0], {"mask": masks, "token_kl": kl,
                                          "token_weights": weighted}[parts[1]]
        if response not in RESPONSES:
            raise ValueError(f"response {response!r} (from {key}) has no entry in RESPONSES")
        target.append(response)
    weighting = registry.token_weighting(method_config)
    catpo = tuple(weighted) if weighting == "catpo" else ()
    tpo = tuple(weighted) if weighting == "tpo" else ()
    # KL needs both models' logits; weights need the reference's forward on that response.
    policy = list(dict.fromkeys(policy + kl))
    reference = list(dict.fromkeys(reference + kl + list(catpo) + list(tpo)))
    options = {k: _option(method_config, CATPO_DEFAULTS, k) for k in CATPO_DEFAULTS}
    options.update({k: _option(method_config, ADAPT_DEFAULTS, k) for k in ADAPT_DEFAULTS})
    options["w_base"] = method_config.get("w_base", registry.OPTION_DEFAULTS["w_base"])
    return ScoringPlan(policy=tuple(policy), reference=tuple(reference), token_kl=tuple(kl),
                       catpo_weights=catpo, tpo_weights=tpo, masks=tuple(dict.fromkeys(masks)),
                       ddw=ddw, options=options)


def batch_tokens(batch: Batch | SftBatch, group: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(input_ids, loss_mask, attention_mask)`` of a token group; an ``SftBatch``'s one group
    stands for ``chosen``."""
    if isinstance(batch, SftBatch):
        if group != "chosen":
            raise ValueError(f"an SftBatch has only the chosen response, not {group!r}")
        group = ""
    fields = [getattr(batch, token_field(group, s), None)
              for s in ("input_ids", "loss_mask", "attention_mask")]
    if any(f is None for f in fields):
        raise ValueError(f"the batch has no token group {group!r}; was the pipeline built with "
                         "the extras this method needs?")
    return tuple(fields)


@dataclasses.dataclass(frozen=True)
class _Rows:
    """Shifted tokens of several responses stacked along the batch: all ``[R*B, T]``."""

    names: tuple[str, ...]
    inputs: jax.Array
    labels: jax.Array
    mask: jax.Array
    attention_mask: jax.Array
    images: tuple[str, ...]

    def split(self, array: jax.Array) -> dict[str, jax.Array]:
        return dict(zip(self.names, jnp.split(array, len(self.names), axis=0)))


def _stack_rows(batch: Batch | SftBatch, rows: tuple[str, ...]) -> _Rows:
    parts = []
    for row in rows:
        input_ids, loss_mask, attention_mask = batch_tokens(batch, RESPONSES[row.removesuffix(
            NOISE_SUFFIX)][0])
        inputs, labels, mask = shift_for_next_token(input_ids, loss_mask)
        parts.append((inputs, labels, mask, jnp.asarray(attention_mask, jnp.int32)))
    stacked = [jnp.concatenate(arrays, axis=0) for arrays in zip(*parts)]
    return _Rows(rows, *stacked, images=tuple(_image_of(r) for r in rows))


def _positions(attention_mask: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


def _forward(model: Llava, rows: _Rows, visual: Mapping[str, jax.Array],
             probe: ProbeSpec | None = None):
    tokens = jnp.concatenate([visual[name] for name in rows.images], axis=0)
    return model(rows.inputs, visual_tokens=tokens, attention_mask=rows.attention_mask,
                 positions=_positions(rows.attention_mask), probe=probe)


def enhancement_mask(reference: Llava, batch: Batch, visual: Mapping[str, jax.Array], *,
                     anchor_steps: int, threshold_percentile: float | None) -> jax.Array:
    """ADAPT's refined mask of every example upsampled to the image: ``[B, H, W]`` in [0, 1].

    The reference reads the chosen response on the clean image with every layer's image probes;
    the queries generating the first ``anchor_steps`` response tokens give ``[B, L, K, N_img]``,
    whose visual anchor and refined mask (METHODS.md §4) are upsampled bicubically to the image.
    """
    rows = _stack_rows(batch, ("chosen",))
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
    features = policy.image_features(pixel_values)
    if vision_frozen:
        features = jax.lax.stop_gradient(features)
    policy_tokens = policy.multi_modal_projector(features)
    if reference is None:
        return policy_tokens, None
    ref_features = features if vision_frozen else reference.image_features(pixel_values)
    return policy_tokens, jax.lax.stop_gradient(reference.multi_modal_projector(ref_features))


def _split_images(tokens: jax.Array, names: tuple[str, ...]) -> dict[str, jax.Array]:
    return dict(zip(names, jnp.split(tokens, len(names), axis=0)))


def _catpo_weights(plan: ScoringPlan, reference: Llava, rows: _Rows, out, visual,
                   eos_token_id: int) -> dict[str, jax.Array]:
    band = catpo_rewards.layer_band(reference.config.text_config.num_hidden_layers,
                                    tuple(plan.options["layer_band"]))
    attention = rows.split(jnp.mean(jnp.stack([out.probes[l] for l in band]), axis=0))
    labels, mask = rows.split(rows.labels), rows.split(rows.mask)
    embed = reference.language_model.model.embed_tokens
    top_k = plan.options["top_k_percent"]
    weights = {}
    for response in plan.catpo_weights:
        weights[f"{response}/token_weights"] = catpo_rewards.token_weights(
            jax.lax.stop_gradient(attention[response]),
            jax.lax.stop_gradient(embed(labels[response])),
            visual[_image_of(response)], mask[response],
            chosen="rejected" not in response, alpha=plan.options["alpha"],
            lambda_ref=plan.options["lambda_ref"], normalize=plan.options["normalize"],
            special_token_mask=labels[response] == eos_token_id,
            top_k_percent=top_k if top_k else None)
    return weights


def _tpo_weights(plan: ScoringPlan, rows: _Rows, logits: jax.Array) -> dict[str, jax.Array]:
    logits, labels, mask = rows.split(logits), rows.split(rows.labels), rows.split(rows.mask)
    weights = {}
    for response in plan.tpo_weights:
        noisy = response + NOISE_SUFFIX
        weights[f"{response}/token_weights"] = tpo_token_weights(
            label_token_logits(logits[response], labels[response], mask[response]),
            label_token_logits(logits[noisy], labels[noisy], mask[noisy]),
            mask[response], chosen="rejected" not in response)
    return weights


def score_batch(plan: ScoringPlan, policy: Llava, reference: Llava | None,
                batch: Batch | SftBatch, *, image_config: ImageProcessorConfig,
                eos_token_id: int, vision_frozen: bool = True,
                cached: Mapping[str, jax.Array] | None = None,
                chunk_size: int | None = logprobs.DEFAULT_CHUNK_SIZE) -> dict[str, jax.Array]:
    """Every array ``plan`` names, for one batch (see the module doc). Call inside ``jit``.

    Args:
      plan: from ``plan_scoring``.
      policy: the trained model (gradients flow through its outputs).
      reference: the frozen reference (a copy, or ``lora.without_adapters(policy)``); None when
        ``cached`` holds every ``plan.reference_outputs`` name.
      batch: the step's batch (device arrays).
      image_config: the preprocessing of ``pixel_values`` (ADAPT's white in normalised units).
      eos_token_id: Cat-PO's special token (weight 1.0).
      vision_frozen: the vision tower is not trained: encode each image once for both models.
      cached: precomputed reference outputs ``{name: [B, T]}`` (reference mode ``cache``).

    Returns:
      ``{name: array}``: ``policy/{r}/token_logps``, ``ref/{r}/token_logps``, ``{r}/mask``,
      ``{r}/token_kl``, ``{r}/token_weights`` ``[B, T]`` and P2-DPO's ``p2dpo/*_weights`` ``[B]``.
    """
    cached = dict(cached or {})
    use_reference = not set(plan.reference_outputs) <= set(cached)
    if use_reference and reference is None:
        raise ValueError(f"no reference model and no cached {sorted(plan.reference_outputs)}")
    if plan.token_kl and not use_reference:
        raise ValueError("token KL needs the reference's logits; it cannot come from a cache")
    names = tuple(n for n in plan.images if n not in DERIVED_IMAGES)
    stacked = jnp.concatenate([getattr(batch, name) for name in names], axis=0)
    ref_model = reference if use_reference else None
    policy_visual, ref_visual = _encode(policy, ref_model, stacked, vision_frozen=vision_frozen)
    policy_visual = _split_images(policy_visual, names)
    ref_visual = _split_images(ref_visual, names) if use_reference else {}
    if plan.needs_anchor:
        ve = enhanced_images(
            reference, batch, ref_visual, image_config, anchor_steps=plan.options["anchor_steps"],
            threshold_percentile=plan.options["mask_threshold_percentile"] or None)
        policy_ve, ref_ve = _encode(policy, reference, jax.lax.stop_gradient(ve),
                                    vision_frozen=vision_frozen)
        policy_visual["ve_pixel_values"], ref_visual["ve_pixel_values"] = policy_ve, ref_ve

    scored: dict[str, jax.Array] = {}
    policy_rows = _stack_rows(batch, plan.policy)
    policy_out = _forward(policy, policy_rows, policy_visual)
    policy_logps = logprobs.token_logprobs(policy_out.logits, policy_rows.labels, policy_rows.mask,
                                           chunk_size=chunk_size)
    scored.update({f"policy/{r}/token_logps": v for r, v in policy_rows.split(policy_logps).items()})

    if use_reference:
        ref_rows = _stack_rows(batch, plan.reference_rows)
        probe = None
        if plan.catpo_weights:
            layers = catpo_rewards.layer_band(reference.config.text_config.num_hidden_layers,
                                              tuple(plan.options["layer_band"]))
            probe = ProbeSpec(layers, "image")
        ref_out = jax.lax.stop_gradient(_forward(reference, ref_rows, ref_visual, probe))
        ref_logps = ref_rows.split(logprobs.token_logprobs(
            ref_out.logits, ref_rows.labels, ref_rows.mask, chunk_size=chunk_size))
        scored.update({f"ref/{r}/token_logps": ref_logps[r] for r in plan.reference})
        if plan.catpo_weights:
            scored.update(_catpo_weights(plan, reference, ref_rows, ref_out, ref_visual,
                                         eos_token_id))
        if plan.tpo_weights:
            scored.update(_tpo_weights(plan, ref_rows, ref_out.logits))
        if plan.token_kl:
            policy_logits = policy_rows.split(policy_out.logits)
            ref_logits = ref_rows.split(ref_out.logits)
            kl_mask = policy_rows.split(policy_rows.mask)
            for r in plan.token_kl:
                scored[f"{r}/token_kl"] = logprobs.token_kl(policy_logits[r], ref_logits[r],
                                                            kl_mask[r], chunk_size=chunk_size)
    scored.update({k: jnp.asarray(cached[k], jnp.float32) for k in plan.reference_outputs
                   if k in cached and k not in scored})

    for r in plan.masks:
        input_ids, loss_mask, _ = batch_tokens(batch, RESPONSES[r][0])
        scored[f"{r}/mask"] = shift_for_next_token(input_ids, loss_mask)[2]
    if plan.ddw:
        scored["p2dpo/focus_weights"], scored["p2dpo/robust_weights"] = ddw_weights(
            batch.ddw_clip_crop, batch.ddw_clip_full, w_base=plan.options["w_base"])
    return scored


def reference_scores(plan: ScoringPlan, reference: Llava, batch: Batch, *,
                     image_config: ImageProcessorConfig, eos_token_id: int,
                     vision_frozen: bool = True) -> dict[str, jax.Array]:
    """The reference part of ``score_batch`` alone (``plan.reference_outputs``), for a cache.

    The reference stands in as the policy too; only its reference outputs are returned.
    """
    scored = score_batch(dataclasses.replace(plan, policy=plan.policy[:1], token_kl=()),
                         reference, reference, batch, image_config=image_config,
                         eos_token_id=eos_token_id, vision_frozen=vision_frozen)
    return {name: scored[name] for name in plan.reference_outputs}
