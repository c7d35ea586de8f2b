"""Method name -> objective, and weighted composition of objective terms from a config block.

The trainer calls one function, ``compute_objective(method_config, scored)``, and can ask
``required_scores(method_config)`` beforehand which arrays (hence which forward passes) a config
needs.

**The config block** is a plain mapping (a dict or an ``ml_collections.ConfigDict``; only ``.get``
and ``.items`` are used), e.g.
``{"name": "catpo", "beta": 0.1, "terms": {"dpo": 1.0, "token_kl": 0.03}, "token_weights": "catpo"}``.
``name`` picks the defaults of ``METHODS`` (its terms and token weighting); ``terms`` (``{term:
weight}``) and ``token_weights`` override them. A term of weight 0 is skipped, and its inputs are
not required (e.g. the no-KL ablation needs no KL). Hyper-parameters and their defaults are
``OPTION_DEFAULTS`` (METHODS.md's). ``loss/<term>`` metrics are the terms before their weights;
``loss/total`` is the weighted sum.

**The scored names** (every per-token array ``[B, T]``, 0 at masked positions by contract):

- ``{model}/{response}/token_logps``: per-token log-probs, ``model`` in ``policy``, ``ref``
  (``old`` for FiSAO's sampling policy);
- ``{response}/mask``: the response tokens; ``{response}/token_weights`` when a token weighting
  is configured (every sequence a term forms is then weighted);
- responses: ``chosen``, ``rejected`` (DPO pair); ``chosen_corrupt`` (mDPO's CoPO: y_w on the
  corrupted image); ``chosen_ve``, ``rejected_noise`` (ADAPT); ``focus_chosen``,
  ``focus_rejected``, ``robust_chosen``, ``robust_rejected``, ``calib_chosen_aug``,
  ``calib_chosen_deg``, ``calib_rejected_aug``, ``calib_rejected_deg`` (P2-DPO); ``sample``
  (FiSAO rollouts);
- ``chosen/token_kl``, ``rejected/token_kl``: ``logprobs.token_kl`` per position;
- ``sample/token_rewards`` ``[B, T]``, ``sample/group_ids`` ``[B]`` (FiSAO);
  ``p2dpo/focus_weights``, ``p2dpo/robust_weights`` ``[B]`` (P2-DPO with ``ddw=True``).

A response re-scored under another image (``chosen_corrupt`` ...) has its own ``/mask`` entry,
even when it is the same array as its original's: the registry never guesses token alignment.

**Token weighting** (``token_weights``): ``None`` (plain sums), ``"catpo"`` (``sum_t w_t logp_t``
for policy and reference alike, and the ``token_kl`` term weighted by the same ``w``) or ``"tpo"``
(``sum_t (logp_t + log w_t)`` for the policy, plain sums for the reference; see ``tpo``). **[our
choice]** a configured weighting applies to every preference term (dpo, copo, anchor, adapt_vag,
p2dpo), so e.g. Cat-PO weights with mDPO's CoPO compare weighted log-probs throughout; ``nll`` is
never weighted and ``token_kl`` only by Cat-PO weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from mmpo_jax.objectives.adapt import vag_dpo_loss
from mmpo_jax.objectives.catpo import weighted_token_kl_loss, weighted_token_sum
from mmpo_jax.objectives.dpo import Term, combine_terms, dpo_loss
from mmpo_jax.objectives.fisao import fisao_ppo_loss
from mmpo_jax.objectives.logprobs import sequence_logps
from mmpo_jax.objectives.mdpo import anchor_loss, copo_loss
from mmpo_jax.objectives.metrics import mean_metric
from mmpo_jax.objectives.p2dpo import check_branches, p2dpo_loss
from mmpo_jax.objectives.tpo import tpo_weighted_logps

MethodConfig = Mapping[str, Any]
Scored = Mapping[str, jax.Array]

TOKEN_WEIGHTINGS = (None, "catpo", "tpo")

METHODS: dict[str, dict[str, Any]] = {
    "dpo": {"terms": {"dpo": 1.0}, "token_weights": None},
    "mdpo": {"terms": {"dpo": 1.0, "copo": 1.0, "anchor": 1.0}, "token_weights": None},
    "catpo": {"terms": {"dpo": 1.0, "token_kl": 0.03}, "token_weights": "catpo"},
    "tpo": {"terms": {"dpo": 1.0}, "token_weights": "tpo"},
    "adapt": {"terms": {"adapt_vag": 1.0}, "token_weights": None},
    "p2dpo": {"terms": {"p2dpo": 1.0}, "token_weights": None},
    "fisao": {"terms": {"fisao_ppo": 1.0}, "token_weights": None},
    # SFT on the chosen responses alone: the control row of every evaluation table.
    "sft": {"terms": {"nll": 1.0}, "token_weights": None},
}
"""Method name -> default ``terms`` (``{term: weight}``) and ``token_weights``."""

OPTION_DEFAULTS: dict[str, Any] = {
    # every preference term
    "beta": 0.1,
    "label_smoothing": 0.0,
    "loss_type": "sigmoid",
    "reduction": "sum",
    # anchor
    "anchor_delta": 0.0,
    # nll: per-token mean over the chosen response [our choice], "sum" available
    "nll_reduction": "mean",
    # p2dpo
    "lambda_calib": 0.3,
    "calib_ref_response": "chosen",
    "w_base": 0.5,
    "ddw": False,
    "branches": ("focus", "robust"),
    # fisao_ppo
    "beta_kl": 0.05,
    "gamma": 1.0,
    "clip_eps": 0.2,
    "num_position_bins": 10,
}


def _option(config: MethodConfig, key: str) -> Any:
    return config.get(key, OPTION_DEFAULTS[key])


def _preference_options(config: MethodConfig) -> dict[str, Any]:
    return {key: _option(config, key) for key in ("beta", "label_smoothing", "loss_type")}


def _token_weighting(config: MethodConfig) -> str | None:
    name = config.get("name")
    weighting = config.get("token_weights", METHODS[name]["token_weights"])
    weighting = None if weighting in (None, "none") else weighting
    if weighting not in TOKEN_WEIGHTINGS:
        raise ValueError(
            f"token_weights={weighting!r} is not one of {TOKEN_WEIGHTINGS} (or 'none')"
        )
    return weighting


def token_weighting(config: MethodConfig) -> str | None:
    """The configured token weighting: ``None``, ``"catpo"`` or ``"tpo"`` (validated)."""
    return _token_weighting(config)


def _sequence_keys(config: MethodConfig, model: str, response: str) -> tuple[str, ...]:
    keys = (f"{model}/{response}/token_logps", f"{response}/mask")
    weighting = _token_weighting(config)
    if weighting == "catpo" or (weighting == "tpo" and model == "policy"):
        keys += (f"{response}/token_weights",)
    return keys


def _sequence(config: MethodConfig, scored: Scored, model: str, response: str) -> jax.Array:
    """``[B]`` (weighted) log-prob of ``response`` under ``model``, per the configured weighting."""
    keys = _sequence_keys(config, model, response)
    token_logps, mask = scored[keys[0]], scored[keys[1]]
    reduction = _option(config, "reduction")
    weighting = _token_weighting(config)
    if weighting == "catpo":
        return weighted_token_sum(token_logps, scored[keys[2]], mask, reduction=reduction)
    if weighting == "tpo" and model == "policy":
        return tpo_weighted_logps(token_logps, scored[keys[2]], mask, reduction=reduction)
    return sequence_logps(token_logps, mask, reduction=reduction)


@dataclasses.dataclass(frozen=True)
class TermSpec:
    """One objective term.

    Attributes:
      sequences: ``config -> ((model, response), ...)`` the (weighted) sequence log-probs it reads.
      extra_keys: ``config -> (key, ...)`` the other scored arrays it reads.
      loss: ``(config, scored, sequences) -> (losses [B], metrics)`` where ``sequences`` maps
        ``"{model}/{response}"`` to ``[B]``.
    """

    sequences: Callable[[MethodConfig], tuple[tuple[str, str], ...]]
    extra_keys: Callable[[MethodConfig], tuple[str, ...]]
    loss: Callable[[MethodConfig, Scored, dict[str, jax.Array]], Term]


def _pairs(*responses: str) -> Callable[[MethodConfig], tuple[tuple[str, str], ...]]:
    return lambda config: tuple((model, r) for r in responses for model in ("policy", "ref"))


def _no_keys(config: MethodConfig) -> tuple[str, ...]:
    return ()


def _dpo_term(config: MethodConfig, scored: Scored, seq: dict[str, jax.Array]) -> Term:
    return dpo_loss(
        seq["policy/chosen"],
        seq["policy/rejected"],
        seq["ref/chosen"],
        seq["ref/rejected"],
        **_preference_options(config),
    )


def _copo_term(config: MethodConfig, scored: Scored, seq: dict[str, jax.Array]) -> Term:
    return copo_loss(
        seq["policy/chosen"],
        seq["policy/chosen_corrupt"],
        seq["ref/chosen"],
        seq["ref/chosen_corrupt"],
        beta=_option(config, "beta"),
    )


def _anchor_term(config: MethodConfig, scored: Scored, seq: dict[str, jax.Array]) -> Term:
    return anchor_loss(
        seq["policy/chosen"],
        seq["ref/chosen"],
        beta=_option(config, "beta"),
        delta=_option(config, "anchor_delta"),
    )


def _token_kl_keys(config: MethodConfig) -> tuple[str, ...]:
    keys = ("chosen/token_kl", "rejected/token_kl", "chosen/mask", "rejected/mask")
    if _token_weighting(config) == "catpo":
        keys += ("chosen/token_weights", "rejected/token_weights")
    return keys


def _token_kl_term(config: MethodConfig, scored: Scored, seq: dict[str, jax.Array]) -> Term:
    chosen_mask, rejected_mask = scored["chosen/mask"], scored["rejected/mask"]
    if _token_weighting(config) == "catpo":
        weights = (scored["chosen/token_weights"], scored["rejected/token_weights"])
    else:
        weights = (jnp.ones(jnp.shape(chosen_mask)), jnp.ones(jnp.shape(rejected_mask)))
    return weighted_token_kl_loss(
        scored["chosen/token_kl"], scored["rejected/token_kl"], *weights, chosen_mask, rejected_mask
    )


def _nll_term(config: MethodConfig, scored: Scored, seq: dict[str, jax.Array]) -> Term:
    losses = -sequence_logps(
        scored["policy/chosen/token_logps"],
        scored["chosen/mask"],
        reduction=_option(config, "nll_reduction"),
    )
    return losses, {"loss/nll": mean_metric(jax.lax.stop_gradient(losses))}


def _adapt_term(config: MethodConfig, scored: Scored, seq: dict[str, jax.Array]) -> Term:
    return vag_dpo_loss(
        seq["policy/chosen_ve"],
        seq["policy/rejected_noise"],
        seq["ref/chosen_ve"],
        seq["ref/rejected_noise"],
        **_preference_options(config),
    )


def _p2dpo_branches(config: MethodConfig) -> tuple[str, ...]:
    return check_branches(_option(config, "branches"), ddw=bool(_option(config, "ddw")))


def _p2dpo_sequences(config: MethodConfig) -> tuple[tuple[str, str], ...]:
    branches = _p2dpo_branches(config)
    pairs = _pairs(*(f"{b}_{r}" for b in branches for r in ("chosen", "rejected")))(config)
    if "focus" in branches and _option(config, "lambda_calib") != 0:
        calib = _option(config, "calib_ref_response")
        pairs += (
            ("policy", "calib_chosen_aug"),
            ("policy", "calib_chosen_deg"),
            ("ref", f"calib_{calib}_aug"),
            ("ref", f"calib_{calib}_deg"),
        )
    return pairs


def _p2dpo_keys(config: MethodConfig) -> tuple[str, ...]:
    return ("p2dpo/focus_weights", "p2dpo/robust_weights") if _option(config, "ddw") else ()


def _p2dpo_term(config: MethodConfig, scored: Scored, seq: dict[str, jax.Array]) -> Term:
    ddw = _option(config, "ddw")
    return p2dpo_loss(
        *(seq.get(f"{model}/{branch}_{response}") for branch in ("focus", "robust")
          for model in ("policy", "ref") for response in ("chosen", "rejected")),
        policy_calib_chosen_aug_logps=seq.get("policy/calib_chosen_aug"),
        policy_calib_chosen_deg_logps=seq.get("policy/calib_chosen_deg"),
        ref_calib_chosen_aug_logps=seq.get("ref/calib_chosen_aug"),
        ref_calib_chosen_deg_logps=seq.get("ref/calib_chosen_deg"),
        ref_calib_rejected_aug_logps=seq.get("ref/calib_rejected_aug"),
        ref_calib_rejected_deg_logps=seq.get("ref/calib_rejected_deg"),
        focus_weights=scored["p2dpo/focus_weights"] if ddw else None,
        robust_weights=scored["p2dpo/robust_weights"] if ddw else None,
        lambda_calib=_option(config, "lambda_calib"),
        calib_ref_response=_option(config, "calib_ref_response"),
        w_base=_option(config, "w_base"),
        branches=_p2dpo_branches(config),
        **_preference_options(config),
    )


_FISAO_KEYS = (
    "policy/sample/token_logps",
    "old/sample/token_logps",
    "ref/sample/token_logps",
    "sample/token_rewards",
    "sample/mask",
    "sample/group_ids",
)


def _fisao_term(config: MethodConfig, scored: Scored, seq: dict[str, jax.Array]) -> Term:
    return fisao_ppo_loss(
        *(scored[key] for key in _FISAO_KEYS),
        **{k: _option(config, k) for k in ("beta_kl", "gamma", "clip_eps", "num_position_bins")},
    )


TERMS: dict[str, TermSpec] = {
    "dpo": TermSpec(_pairs("chosen", "rejected"), _no_keys, _dpo_term),
    "copo": TermSpec(_pairs("chosen", "chosen_corrupt"), _no_keys, _copo_term),
    "anchor": TermSpec(_pairs("chosen"), _no_keys, _anchor_term),
    "token_kl": TermSpec(_pairs(), _token_kl_keys, _token_kl_term),
    "nll": TermSpec(
        _pairs(), lambda config: ("policy/chosen/token_logps", "chosen/mask"), _nll_term
    ),
    "adapt_vag": TermSpec(_pairs("chosen_ve", "rejected_noise"), _no_keys, _adapt_term),
    "p2dpo": TermSpec(_p2dpo_sequences, _p2dpo_keys, _p2dpo_term),
    "fisao_ppo": TermSpec(_pairs(), lambda config: _FISAO_KEYS, _fisao_term),
}
"""Term name -> what it reads and how it computes its loss."""


def active_terms(method_config: MethodConfig) -> dict[str, float]:
    """The ``{term: weight}`` a config runs: its ``terms`` or its method's, zero weights dropped."""
    name = method_config.get("name")
    if name not in METHODS:
        raise ValueError(f"method name={name!r} is not one of {sorted(METHODS)}")
    terms = method_config.get("terms", None)
    terms = METHODS[name]["terms"] if terms is None else terms
    unknown = sorted(set(dict(terms.items())) - set(TERMS))
    if unknown:
        raise ValueError(f"unknown objective terms {unknown}; valid terms are {sorted(TERMS)}")
    active = {term: float(weight) for term, weight in terms.items() if weight != 0}
    if not active:
        raise ValueError(f"method {name!r} has no term with a non-zero weight: terms={dict(terms)}")
    _token_weighting(method_config)  # validate early
    return active


def required_scores(method_config: MethodConfig) -> tuple[str, ...]:
    """Every ``scored`` name ``compute_objective`` reads for this config, sorted."""
    keys: set[str] = set()
    for term in active_terms(method_config):
        spec = TERMS[term]
        for model, response in spec.sequences(method_config):
            keys.update(_sequence_keys(method_config, model, response))
        keys.update(spec.extra_keys(method_config))
    return tuple(sorted(keys))


def compute_objective(method_config: MethodConfig, scored: Scored) -> Term:
    """Per-example loss of a configured method: ``sum_term weight * term_losses``.

    Args:
      method_config: the method block (see the module doc): ``name``, optional ``terms``,
        ``token_weights`` and hyper-parameters (``OPTION_DEFAULTS``).
      scored: the named arrays the step produced (module doc; ``required_scores`` lists them).

    Returns:
      ``(losses [B] float32, metrics)``: every term's metrics (a key two terms share is kept
      from the first and stored as ``<term>/<key>`` for later ones) plus ``loss/total``.
    """
    terms = active_terms(method_config)
    missing = [key for key in required_scores(method_config) if key not in scored]
    if missing:
        raise KeyError(
            f"method {method_config.get('name')!r} with terms {terms} needs scored arrays "
            f"{missing}; got {sorted(scored)}"
        )
    # Each (model, response) sequence is reduced once, however many terms read it.
    pairs = dict.fromkeys(pair for term in terms for pair in TERMS[term].sequences(method_config))
    sequences = {
        f"{model}/{response}": _sequence(method_config, scored, model, response)
        for model, response in pairs
    }
    weighted = {
        term: (weight, TERMS[term].loss(method_config, scored, sequences))
        for term, weight in terms.items()
    }
    losses, metrics = combine_terms(weighted)
    metrics["loss/total"] = mean_metric(jax.lax.stop_gradient(losses))
    return losses, metrics
