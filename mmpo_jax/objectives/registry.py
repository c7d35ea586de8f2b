"""Every declared term, token weighting and method, and a config block's objective from them.

The declarations (``objectives.terms``) live in the objective modules: every module of this
package with a ``DECLARATIONS`` tuple contributes it, found by listing the package, so a new
method is a new module and no edit here. ``register`` adds declarations at run time (a method
outside the package); ``registered`` does so for the duration of a ``with`` block.

**The config block** is a plain mapping (a dict or an ``ml_collections.ConfigDict``; only
``.get`` and ``.items`` are used), e.g. ``{"name": "catpo", "beta": 0.1, "terms": {"dpo": 1.0,
"token_kl": 0.03}, "token_weights": "catpo"}``. ``name`` picks a ``Method``: its default terms and
token weighting; ``terms`` (``{term: weight}``) and ``token_weights`` (``"none"`` for none)
override them. A term of weight 0 is skipped and its inputs are not required (the no-KL ablation
needs no KL). Every other key is an option of a declared term or weighting; the ones the active
terms and weighting do not declare are ignored here (the config checks reject unknown ones).

``compute_objective(method, scored)`` is the per-example loss ``sum_term weight * term_losses``:
``loss/<term>`` metrics are the terms before their weights, ``loss/total`` the weighted sum.
``required_scores(method)`` lists the ``Score`` s it reads, which tells the engine what to
compute. **[our choice]** a configured weighting applies to every weighted term's sequences (dpo,
copo, anchor, adapt_vag, p2dpo), so e.g. Cat-PO weights with mDPO's CoPO compare weighted
log-probs throughout; ``nll`` and ``fisao_ppo`` are never weighted, ``token_kl`` by the
configured weighting.
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
from typing import Any, Iterator, Mapping

import jax

from mmpo_jax.objectives import terms as terms_lib
from mmpo_jax.objectives.catpo import weighted_token_sum
from mmpo_jax.objectives.dpo import combine_terms
from mmpo_jax.objectives.logprobs import sequence_logps
from mmpo_jax.objectives.metrics import mean_metric
from mmpo_jax.objectives.terms import (Inputs, Method, Option, Options, Response, Score, Term,
                                       TermResult, Weighting)

MethodConfig = Mapping[str, Any]
Scored = Mapping[Score, jax.Array]
Declaration = Term | Weighting | Method

NO_WEIGHTING = "none"
CORE_FIELDS = ("name", "terms", "token_weights")
"""Method-block fields that are not options."""

_TERMS: dict[str, Term] = {}
_WEIGHTINGS: dict[str, Weighting] = {}
_METHODS: dict[str, Method] = {}
_TABLES = {Term: _TERMS, Weighting: _WEIGHTINGS, Method: _METHODS}


def register(*declarations: Declaration) -> None:
    """Adds terms, weightings and methods; a name already taken, or an option declared with
    another default or range than an existing one of the same name, raises ``ValueError``."""
    for declaration in declarations:
        table = _TABLES.get(type(declaration))
        if table is None:
            raise TypeError(f"{declaration!r} is not a Term, Weighting or Method")
        if declaration.name in table:
            raise ValueError(f"a {type(declaration).__name__} named {declaration.name!r} is "
                             "already registered")
        if isinstance(declaration, (Term, Weighting)):
            known = option_declarations()
            for name, option in declaration.options.items():
                if name in CORE_FIELDS or known.get(name, option) != option:
                    raise ValueError(f"{declaration.name!r} declares option {name!r} as "
                                     f"{option}, which is taken ({known.get(name)})")
        table[declaration.name] = declaration


def unregister(*declarations: Declaration) -> None:
    for declaration in declarations:
        _TABLES[type(declaration)].pop(declaration.name, None)


@contextlib.contextmanager
def registered(*declarations: Declaration) -> Iterator[None]:
    """``register`` for the duration of a ``with`` block (a method defined outside the package)."""
    register(*declarations)
    try:
        yield
    finally:
        unregister(*declarations)


def _discover() -> None:
    package = importlib.import_module(__package__)
    for module_info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__package__}.{module_info.name}")
        register(*getattr(module, "DECLARATIONS", ()))


def terms() -> Mapping[str, Term]:
    return dict(_TERMS)


def weightings() -> Mapping[str, Weighting]:
    return dict(_WEIGHTINGS)


def methods() -> Mapping[str, Method]:
    return dict(_METHODS)


def option_declarations() -> dict[str, Option]:
    """Every option any registered term or weighting declares."""
    options: dict[str, Option] = {}
    for declaration in (*_TERMS.values(), *_WEIGHTINGS.values()):
        options.update(declaration.options)
    return options


def method(method_config: MethodConfig) -> Method:
    name = method_config.get("name")
    if name not in _METHODS:
        raise ValueError(f"method name={name!r} is not one of {sorted(_METHODS)}")
    return _METHODS[name]


def token_weighting(method_config: MethodConfig) -> Weighting | None:
    """The configured token weighting, or None (validated)."""
    name = method_config.get("token_weights", None)
    name = method(method_config).token_weights if name is None else name
    if name in (None, NO_WEIGHTING):
        return None
    if name not in _WEIGHTINGS:
        raise ValueError(f"token_weights={name!r} is not one of "
                         f"{sorted(_WEIGHTINGS) + [NO_WEIGHTING]}")
    return _WEIGHTINGS[name]


def active_terms(method_config: MethodConfig) -> dict[str, float]:
    """The ``{term: weight}`` a config runs: its ``terms`` or its method's, zero weights dropped."""
    default = method(method_config)
    configured = method_config.get("terms", None)
    configured = default.terms if configured is None else configured
    unknown = sorted(set(dict(configured.items())) - set(_TERMS))
    if unknown:
        raise ValueError(f"unknown objective terms {unknown}; valid terms are {sorted(_TERMS)}")
    active = {term: float(weight) for term, weight in configured.items() if weight != 0}
    if not active:
        raise ValueError(f"method {default.name!r} has no term with a non-zero weight: "
                         f"terms={dict(configured)}")
    token_weighting(method_config)  # validate early
    return active


def options_read(method_config: MethodConfig) -> dict[str, Option]:
    """The options the config's active terms and weighting declare, by name."""
    options: dict[str, Option] = {}
    weighting = token_weighting(method_config)
    for declaration in [_TERMS[name] for name in active_terms(method_config)] + (
            [weighting] if weighting is not None else []):
        options.update(declaration.options)
    return options


def resolve_options(method_config: MethodConfig) -> dict[str, Any]:
    """The option values the objective runs with: the config's, else the declared defaults; plus
    ``token_weights``, the weighting's name or None. Lists become tuples."""
    resolved = {}
    for name, option in options_read(method_config).items():
        value = method_config.get(name, None)
        value = option.default if value is None else value
        resolved[name] = tuple(value) if isinstance(value, list) else value
    weighting = token_weighting(method_config)
    resolved["token_weights"] = None if weighting is None else weighting.name
    return resolved


def couples_examples(method_config: MethodConfig) -> bool:
    """Whether an active term's per-example losses depend on other examples of the batch."""
    return any(_TERMS[name].couples_examples for name in active_terms(method_config))


def _sequence_scores(model: str, response: Response, weighted: bool) -> tuple[Score, ...]:
    scores = (terms_lib.token_logps(model, response), terms_lib.mask(response))
    return scores + ((terms_lib.token_weights(response),) if weighted else ())


def required_scores(method_config: MethodConfig) -> tuple[Score, ...]:
    """Every ``Score`` ``compute_objective`` reads for this config, sorted."""
    options = resolve_options(method_config)
    weighted = options["token_weights"] is not None
    scores: set[Score] = set()
    for name in active_terms(method_config):
        term = _TERMS[name]
        for model, response in term.sequences(options):
            scores.update(_sequence_scores(model, response, weighted and term.weighted))
        scores.update(term.reads(options))
    return tuple(sorted(scores))


def compute_objective(method_config: MethodConfig, scored: Scored) -> TermResult:
    """Per-example loss of a configured method: ``sum_term weight * term_losses``.

    Args:
      method_config: the method block (see the module doc).
      scored: ``{Score: array}``, at least ``required_scores(method_config)``; per-token arrays
        ``[B, T]`` are 0 at masked positions by contract, per-example ones ``[B]``.

    Returns:
      ``(losses [B] float32, metrics)``: every term's metrics (a key two terms share is kept from
      the first and stored as ``<term>/<key>`` for later ones) plus ``loss/total``.
    """
    weights = active_terms(method_config)
    options = resolve_options(method_config)
    missing = [score.key for score in required_scores(method_config) if score not in scored]
    if missing:
        raise KeyError(f"method {method_config.get('name')!r} with terms {weights} needs scored "
                       f"arrays {missing}; got {sorted(score.key for score in scored)}")
    reduction = options.get("reduction", "sum")
    sequences: dict[tuple[str, Response, bool], jax.Array] = {}

    def sequence_of(term: Term):
        weighted = term.weighted and options["token_weights"] is not None

        def sequence(model: str, response: Response) -> jax.Array:
            key = (model, response, weighted)
            if key not in sequences:  # each sequence is reduced once, however many terms read it
                token_logps = scored[terms_lib.token_logps(model, response)]
                response_mask = scored[terms_lib.mask(response)]
                sequences[key] = (
                    weighted_token_sum(token_logps, scored[terms_lib.token_weights(response)],
                                       response_mask, reduction=reduction)
                    if weighted else sequence_logps(token_logps, response_mask,
                                                    reduction=reduction))
            return sequences[key]

        return sequence

    results = {name: (weight, _TERMS[name].loss(Inputs(options, scored,
                                                       sequence_of(_TERMS[name]))))
               for name, weight in weights.items()}
    losses, metrics = combine_terms(results)
    metrics["loss/total"] = mean_metric(jax.lax.stop_gradient(losses))
    return losses, metrics


_discover()
