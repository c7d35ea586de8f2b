"""P2-DPO: calibrated DPO on focus-enhanced and visual-robustness pairs (METHODS.md §5).

Per example:

``L = w_focus * (L_dpo(focus pair) + lambda_calib * L_calib) + w_rob * L_dpo(robust pair)``,

``L_calib = -log sigma(beta * ((logp_theta(y_w|I_aug) - logp_theta(y_w|I_deg))
                              - (logp_ref(y|I_aug) - logp_ref(y|I_deg))))``

with ``y = y_w`` (``calib_ref_response="chosen"``, the paper, default) or ``y = y_l``
(``"rejected"``, the released code). The policy side of ``L_calib`` always scores ``y_w``. The
robust pair is scored on ``I_noise`` (both responses), the very image its ``y_l`` was sampled
from (``data.fields.PAIR_NOISED``: rebuilt from the key stored with the pair, never a fresh
draw). ``(w_focus, w_rob)`` come from ``ddw_weights`` (the pair's CLIP scores) or default to
0.5 / 0.5.

``branches`` selects the paper's ablations: ``("robust",)`` is "w/o FEPs", ``("focus",)`` "w/o
VRPs"; the branch left trains alone with weight 1 (the paper's single-pair rows are plain DPO on
that pair) [our choice of scale], and the dropped branch's log-probs are neither needed nor read.

Every preference term goes through ``mmpo_jax.objectives.dpo`` (``dpo_loss`` /
``preference_loss``), so ``label_smoothing`` and ``loss_type`` apply to all three alike.

``DECLARATIONS``: the ``p2dpo`` term and method. Its responses: the focus pair (``chosen`` /
``rejected`` tokens on the original image, as the training example presents it), the robustness
pair (its own token groups on the pair's ``I_noise``) and the calibration reads (``y_w`` or ``y_l`` on
``I_aug`` / ``I_deg``; ``I_aug`` as the pairs' ``combine_mode`` made it: option
``combine_mode``, "stitch" or "two_images", which must match the generation's); with ``ddw`` it
reads the batch's ``ddw_clip_crop`` / ``ddw_clip_full``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from mmpo_jax.data.fields import AUGMENTED, DEGRADED, FOCUS_PAIR, PAIR_NOISED
from mmpo_jax.data.interventions import COMBINE_MODES
from mmpo_jax.objectives import terms
from mmpo_jax.objectives.dpo import (PREFERENCE_OPTIONS, dpo_loss, preference_loss,
                                     preference_options)
from mmpo_jax.objectives.metrics import Metric, accumulate, mean_metric
from mmpo_jax.objectives.terms import (POLICY, REFERENCE, Inputs, Method, Option, Options, Response,
                                       Term, TermResult)

CALIB_REF_RESPONSES = ("chosen", "rejected")
BRANCHES = ("focus", "robust")

FOCUS_CHOSEN = Response("focus_chosen", tokens="chosen")
FOCUS_REJECTED = Response("focus_rejected", tokens="rejected")
ROBUST_CHOSEN = Response("robust_chosen", tokens="robust_chosen", image=PAIR_NOISED)
ROBUST_REJECTED = Response("robust_rejected", tokens="robust_rejected", image=PAIR_NOISED)
CALIB = {(tokens, image): Response(f"calib_{tokens}_{suffix}", tokens=tokens, image=image)
         for tokens in CALIB_REF_RESPONSES for suffix, image in (("aug", AUGMENTED),
                                                                  ("deg", DEGRADED))}
CALIB.update({(tokens, FOCUS_PAIR): Response(f"calib_{tokens}_two_images",
                                             tokens=f"focus_aug_{tokens}", image=FOCUS_PAIR)
              for tokens in CALIB_REF_RESPONSES})
"""``(token group, image) -> Response`` of the calibration term: ``calib_chosen_aug`` ... .
With ``combine_mode="two_images"`` the ``I_aug`` reads are ``calib_{y}_two_images``: the reply
after the enhanced prompt with the image and its crop (the input ``y_w`` was generated from);
``"stitch"`` reads it after ``P`` on the stitched canvas."""
AUGMENTED_KIND = {"stitch": AUGMENTED, "two_images": FOCUS_PAIR}
"""``combine_mode`` -> the image kind of the calibration term's ``I_aug`` reads."""
PAIRS = {"focus": (FOCUS_CHOSEN, FOCUS_REJECTED), "robust": (ROBUST_CHOSEN, ROBUST_REJECTED)}
"""Branch -> its (chosen, rejected) responses."""
DDW_FIELDS = ("ddw_clip_crop", "ddw_clip_full")


def ddw_weights(
    clip_crop: jax.Array,
    clip_full: jax.Array,
    *,
    alpha_max: float = 0.2,
    tau: float = 0.1,
    w_base: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
    """Dynamic Deficiency Weighting: ``(w_focus, w_rob)``, each ``[B]``, summing to ``2 w_base``.

    ``r = clip_crop / max(clip_full, 1e-8)``, ``a = alpha_max tanh((r - 1) / tau)``,
    ``w_focus = w_base + a``, ``w_rob = w_base - a`` (0.5 / 0.5 at ``r = 1``).

    Args:
      clip_crop: ``[B]`` CLIPScore(prompt, crop).
      clip_full: ``[B]`` CLIPScore(prompt, full image).
    """
    clip_crop = jnp.asarray(clip_crop, jnp.float32)
    ratio = clip_crop / jnp.maximum(jnp.asarray(clip_full, jnp.float32), 1e-8)
    adjust = alpha_max * jnp.tanh((ratio - 1.0) / tau)
    return w_base + adjust, w_base - adjust


def check_branches(branches: Sequence[str], *, ddw: bool = False) -> tuple[str, ...]:
    """``branches`` as a tuple in ``BRANCHES`` order; raises ``ValueError`` on an empty or unknown
    selection, or on DDW (which splits weight between both branches) with one branch."""
    chosen = tuple(branches)
    unknown = sorted(set(chosen) - set(BRANCHES))
    if unknown or not chosen:
        raise ValueError(f"branches={chosen!r}: choose a non-empty subset of {BRANCHES}")
    if ddw and len(set(chosen)) < len(BRANCHES):
        raise ValueError(f"ddw=True splits weight between both branches; branches={chosen!r}")
    return tuple(b for b in BRANCHES if b in chosen)


def _reward_part(metrics: dict[str, Metric], prefix: str | None = None) -> dict[str, Metric]:
    """The ``rewards/*`` entries of a ``dpo_loss`` metrics dict, optionally as ``prefix/rewards/*``."""
    rewards = {key: value for key, value in metrics.items() if key.startswith("rewards/")}
    return rewards if prefix is None else {f"{prefix}/{k}": v for k, v in rewards.items()}


def calibration_loss(
    policy_chosen_aug_logps: jax.Array,
    policy_chosen_deg_logps: jax.Array,
    ref_aug_logps: jax.Array,
    ref_deg_logps: jax.Array,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[jax.Array, jax.Array]:
    """``L_calib`` on the perceptual confidence gains ``logp(.|I_aug) - logp(.|I_deg)``.

    Args:
      policy_chosen_aug_logps, policy_chosen_deg_logps: ``[B]`` ``logp_theta(y_w | I_aug / I_deg)``.
      ref_aug_logps, ref_deg_logps: ``[B]`` ``logp_ref(y | I_aug / I_deg)`` for the configured
        ``y`` (under ``stop_gradient``).

    Returns:
      ``(losses [B], z [B])`` with ``z = beta * (policy gain - reference gain)``.
    """
    policy_gain = jnp.asarray(policy_chosen_aug_logps, jnp.float32) - jnp.asarray(
        policy_chosen_deg_logps, jnp.float32
    )
    ref_gain = jax.lax.stop_gradient(
        jnp.asarray(ref_aug_logps, jnp.float32) - jnp.asarray(ref_deg_logps, jnp.float32)
    )
    z = beta * (policy_gain - ref_gain)
    losses = preference_loss(z, beta=beta, label_smoothing=label_smoothing, loss_type=loss_type)
    return losses, z


def p2dpo_loss(
    policy_focus_chosen_logps: jax.Array | None,
    policy_focus_rejected_logps: jax.Array | None,
    ref_focus_chosen_logps: jax.Array | None,
    ref_focus_rejected_logps: jax.Array | None,
    policy_robust_chosen_logps: jax.Array | None,
    policy_robust_rejected_logps: jax.Array | None,
    ref_robust_chosen_logps: jax.Array | None,
    ref_robust_rejected_logps: jax.Array | None,
    *,
    policy_calib_chosen_aug_logps: jax.Array | None = None,
    policy_calib_chosen_deg_logps: jax.Array | None = None,
    ref_calib_chosen_aug_logps: jax.Array | None = None,
    ref_calib_chosen_deg_logps: jax.Array | None = None,
    ref_calib_rejected_aug_logps: jax.Array | None = None,
    ref_calib_rejected_deg_logps: jax.Array | None = None,
    focus_weights: jax.Array | None = None,
    robust_weights: jax.Array | None = None,
    beta: float = 0.1,
    lambda_calib: float = 0.3,
    calib_ref_response: str = "chosen",
    w_base: float = 0.5,
    branches: Sequence[str] = BRANCHES,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> tuple[jax.Array, dict[str, Metric]]:
    """The P2-DPO loss per example, on summed response log-probs (all ``[B]``).

    Args:
      policy_focus_*/ref_focus_*: the focus-enhanced pair ``(y_w from I_aug, y_l from I_deg)``,
        scored as the training example presents it (None when ``"focus"`` is not a branch).
      policy_robust_*/ref_robust_*: the visual-robustness pair, both responses scored on
        ``I_noise`` (None when ``"robust"`` is not a branch).
      policy_calib_chosen_{aug,deg}_logps: ``logp_theta(y_w | I_aug)``, ``logp_theta(y_w | I_deg)``.
      ref_calib_{chosen,rejected}_{aug,deg}_logps: ``logp_ref(y | I_aug / I_deg)`` for
        ``y = y_w`` / ``y = y_l``; only the pair named by ``calib_ref_response`` is read (and
        required). Nothing of the calibration term is required when ``lambda_calib == 0``.
      focus_weights, robust_weights: ``[B]`` DDW weights; None gives ``w_base`` each.
      beta: DPO temperature (0.1).
      lambda_calib: weight of ``L_calib`` inside the focus branch (0.3).
      calib_ref_response: ``"chosen"`` (paper) or ``"rejected"`` (released code), see module doc.
      branches: the pairs trained, a subset of ``BRANCHES`` (module doc); one branch trains with
        weight 1 and no DDW.
      label_smoothing, loss_type: as ``mmpo_jax.objectives.dpo.preference_loss``.

    Returns:
      ``(losses [B] float32, metrics)``: ``loss/{dpo_focus, calib, focus, dpo_robust}``,
      ``weights/{focus, robust}``, ``rewards/*`` over the trained pairs,
      ``{focus,robust}/rewards/*`` per pair and ``calib/z`` (each only for the branches trained).
    """
    if calib_ref_response not in CALIB_REF_RESPONSES:
        raise ValueError(
            f"calib_ref_response={calib_ref_response!r} is not one of {CALIB_REF_RESPONSES}"
        )
    branches = check_branches(branches, ddw=focus_weights is not None or robust_weights is not None)
    options = dict(beta=beta, label_smoothing=label_smoothing, loss_type=loss_type)
    pairs = {
        "focus": (policy_focus_chosen_logps, policy_focus_rejected_logps,
                  ref_focus_chosen_logps, ref_focus_rejected_logps),
        "robust": (policy_robust_chosen_logps, policy_robust_rejected_logps,
                   ref_robust_chosen_logps, ref_robust_rejected_logps),
    }
    missing = [b for b in branches if any(value is None for value in pairs[b])]
    if missing:
        raise ValueError(f"branches={branches} needs the log-probs of the {missing} pair(s)")
    dpo, pair_metrics = {}, {}
    for branch in branches:
        dpo[branch], pair_metrics[branch] = dpo_loss(*pairs[branch], **options)
    # (sum, count) pairs add up to the mean over the trained pairs of every example.
    metrics = dict(functools.reduce(accumulate, (_reward_part(pair_metrics[b]) for b in branches)))
    for branch in branches:
        metrics.update(_reward_part(pair_metrics[branch], branch))

    branch_losses = dict(dpo)
    if "focus" in branches and lambda_calib != 0:
        calib_inputs = {
            "policy_calib_chosen_aug_logps": policy_calib_chosen_aug_logps,
            "policy_calib_chosen_deg_logps": policy_calib_chosen_deg_logps,
            f"ref_calib_{calib_ref_response}_aug_logps": (
                ref_calib_chosen_aug_logps
                if calib_ref_response == "chosen"
                else ref_calib_rejected_aug_logps
            ),
            f"ref_calib_{calib_ref_response}_deg_logps": (
                ref_calib_chosen_deg_logps
                if calib_ref_response == "chosen"
                else ref_calib_rejected_deg_logps
            ),
        }
        missing = [name for name, value in calib_inputs.items() if value is None]
        if missing:
            raise ValueError(
                f"lambda_calib={lambda_calib} with calib_ref_response={calib_ref_response!r} "
                f"needs {missing}; pass them or set lambda_calib=0"
            )
        calib, calib_z = calibration_loss(*calib_inputs.values(), **options)
        branch_losses["focus"] = dpo["focus"] + lambda_calib * calib
        metrics["loss/calib"] = mean_metric(jax.lax.stop_gradient(calib))
        metrics["calib/z"] = mean_metric(jax.lax.stop_gradient(calib_z))

    batch = branch_losses[branches[0]].shape
    given = {"focus": focus_weights, "robust": robust_weights}
    base = w_base if len(branches) == len(BRANCHES) else 1.0
    losses = jnp.zeros(batch, jnp.float32)
    for branch in branches:
        weight = jnp.full(batch, base) if given[branch] is None else jnp.asarray(given[branch])
        weight = jax.lax.stop_gradient(weight.astype(jnp.float32))
        losses = losses + weight * branch_losses[branch]
        metrics[f"weights/{branch}"] = mean_metric(weight)
    if "focus" in branches:
        metrics["loss/dpo_focus"] = mean_metric(jax.lax.stop_gradient(dpo["focus"]))
        metrics["loss/focus"] = mean_metric(jax.lax.stop_gradient(branch_losses["focus"]))
    if "robust" in branches:
        metrics["loss/dpo_robust"] = mean_metric(jax.lax.stop_gradient(dpo["robust"]))
    metrics["loss/p2dpo"] = mean_metric(jax.lax.stop_gradient(losses))
    return losses, metrics


def _branches(options: Options) -> tuple[str, ...]:
    return check_branches(options["branches"], ddw=bool(options["ddw"]))


def _sequences(options: Options) -> tuple[tuple[str, Response], ...]:
    branches = _branches(options)
    sequences = tuple((model, response) for branch in branches for response in PAIRS[branch]
                      for model in (POLICY, REFERENCE))
    if "focus" in branches and options["lambda_calib"] != 0:
        reference = options["calib_ref_response"]
        images = (AUGMENTED_KIND[options["combine_mode"]], DEGRADED)
        sequences += tuple((POLICY, CALIB["chosen", image]) for image in images)
        sequences += tuple((REFERENCE, CALIB[reference, image]) for image in images)
    return sequences


def _reads(options: Options) -> tuple[terms.Score, ...]:
    return tuple(terms.example_value(name) for name in DDW_FIELDS) if options["ddw"] else ()


def _p2dpo_term(inputs: Inputs) -> TermResult:
    options = inputs.options
    wanted = dict.fromkeys(_sequences(options))
    seq = {(model, response): inputs.sequence(model, response) for model, response in wanted}
    weights = (ddw_weights(*(inputs[terms.example_value(n)] for n in DDW_FIELDS),
                           w_base=options["w_base"]) if options["ddw"] else (None, None))
    aug = AUGMENTED_KIND[options["combine_mode"]]
    return p2dpo_loss(
        *(seq.get((model, response)) for branch in BRANCHES for model in (POLICY, REFERENCE)
          for response in PAIRS[branch]),
        policy_calib_chosen_aug_logps=seq.get((POLICY, CALIB["chosen", aug])),
        policy_calib_chosen_deg_logps=seq.get((POLICY, CALIB["chosen", DEGRADED])),
        ref_calib_chosen_aug_logps=seq.get((REFERENCE, CALIB["chosen", aug])),
        ref_calib_chosen_deg_logps=seq.get((REFERENCE, CALIB["chosen", DEGRADED])),
        ref_calib_rejected_aug_logps=seq.get((REFERENCE, CALIB["rejected", aug])),
        ref_calib_rejected_deg_logps=seq.get((REFERENCE, CALIB["rejected", DEGRADED])),
        focus_weights=weights[0], robust_weights=weights[1],
        lambda_calib=options["lambda_calib"], calib_ref_response=options["calib_ref_response"],
        w_base=options["w_base"], branches=_branches(options), **preference_options(options))


def _check_branches(branches) -> str | None:
    try:
        check_branches(branches)
    except ValueError as error:
        return str(error)
    return None


P2DPO = Term("p2dpo", _p2dpo_term, {
    **PREFERENCE_OPTIONS,
    "lambda_calib": Option(0.3, bounds=(0.0, None)),
    "calib_ref_response": Option("chosen", choices=CALIB_REF_RESPONSES),
    "w_base": Option(0.5, bounds=(0.0, 1.0)),
    "ddw": Option(False),
    "branches": Option(BRANCHES, check=_check_branches),
    "combine_mode": Option("stitch", choices=COMBINE_MODES),
}, sequences=_sequences, reads=_reads)

DECLARATIONS = (P2DPO, Method("p2dpo", {"p2dpo": 1.0}))
