"""How an objective term declares itself: its loss, its options, and what it scores and reads.

Every objective module ends with ``DECLARATIONS``: its ``Term`` s (one summand of a method's loss
each), the token ``Weighting`` s it defines and the ``Method`` s (named default compositions) it
offers. ``objectives.registry`` collects them; everything else is derived from them: the options a
config block may set and their checks (``config``), the forwards and images a step computes
(``engine.scoring``), the pipeline extras and record fields a method needs. Adding a method that
needs no new kind of image is one objective module with its declarations and one config file.

**What a term reads** is a set of typed ``Score`` requests, never strings to parse:

- ``token_logps(model, response)``: ``[B, T]`` per-token log-probs of a response under ``POLICY``,
  ``REFERENCE`` or ``SAMPLER`` (the policy that drew on-policy samples);
- ``mask(response)``: ``[B, T]`` the response tokens (position ``t`` predicts token ``t + 1``);
- ``token_kl(response)``: ``[B, T]`` ``KL(pi_theta || pi_ref)`` of the next-token distributions;
- ``token_weights(response)``: ``[B, T]`` the configured token weighting's weights;
- ``token_value(name, response)``: ``[B, T]`` any other per-token value (FiSAO's rewards);
- ``example_value(name)``: ``[B]`` a per-example value (a batch field such as a CLIP score, or a
  rollout's group id).

A ``Response`` is a token group of the batch read on an image kind (``data.fields``' vocabulary):
``Response("chosen_corrupt", tokens="chosen", image=CORRUPTED)`` is ``y_w`` on mDPO's ``I'``.
Most terms read whole-response log-probs: they declare ``sequences`` (``(model, response)``
pairs) and get ``Inputs.sequence(model, response)`` ``[B]``, weighted by the configured token
weighting when the term is ``weighted``; their masks and weights are requested for them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax

from mmpo_jax.data import fields
from mmpo_jax.data.fields import ORIGINAL

POLICY, REFERENCE, SAMPLER = "policy", "ref", "old"
MODELS = (POLICY, REFERENCE, SAMPLER)


@dataclasses.dataclass(frozen=True, order=True)
class Response:
    """A response of the example read on one image.

    Attributes:
      name: unique among responses (``chosen_corrupt``); the middle of its scores' keys.
      tokens: the token group holding its tokens (``data.fields.TOKEN_GROUPS``).
      image: the image kind it is scored on (``data.fields.IMAGE_KINDS``).
    """

    name: str
    tokens: str
    image: str = ORIGINAL

    def __post_init__(self) -> None:
        if self.tokens not in fields.TOKEN_GROUPS:
            raise ValueError(f"response {self.name!r}: token group {self.tokens!r} is not one of "
                             f"{sorted(fields.TOKEN_GROUPS)}")
        if self.image not in fields.IMAGE_KINDS:
            raise ValueError(f"response {self.name!r}: image {self.image!r} is not one of "
                             f"{sorted(fields.IMAGE_KINDS)}")

    @property
    def from_rollouts(self) -> bool:
        return fields.TOKEN_GROUPS[self.tokens].extra == fields.ROLLOUTS


CHOSEN = Response("chosen", "chosen")
REJECTED = Response("rejected", "rejected")
_NO_RESPONSE = Response("", "chosen")

TOKEN_LOGPS, MASK, TOKEN_KL, TOKEN_WEIGHTS, TOKEN_VALUE, EXAMPLE_VALUE = (
    "token_logps", "mask", "token_kl", "token_weights", "token_value", "example_value")


@dataclasses.dataclass(frozen=True, order=True)
class Score:
    """One array a term reads; build it with the functions below. Ordered (a pytree dict key).

    Attributes:
      kind: ``TOKEN_LOGPS``, ``MASK``, ``TOKEN_KL``, ``TOKEN_WEIGHTS``, ``TOKEN_VALUE`` or
        ``EXAMPLE_VALUE``.
      response: the response it belongs to (all kinds but ``EXAMPLE_VALUE``).
      model: ``TOKEN_LOGPS`` only.
      name: ``TOKEN_VALUE`` / ``EXAMPLE_VALUE`` only.
    """

    kind: str
    response: Response = _NO_RESPONSE
    model: str = ""
    name: str = ""

    @property
    def key(self) -> str:
        """Its name in metrics, caches and error messages (``ref/chosen/token_logps``)."""
        if self.kind == TOKEN_LOGPS:
            return f"{self.model}/{self.response.name}/{TOKEN_LOGPS}"
        if self.kind == EXAMPLE_VALUE:
            return self.name
        return f"{self.response.name}/{self.name or self.kind}"

    def __repr__(self) -> str:
        return f"Score({self.key})"


def token_logps(model: str, response: Response) -> Score:
    if model not in MODELS:
        raise ValueError(f"model {model!r} is not one of {MODELS}")
    return Score(TOKEN_LOGPS, response, model=model)


def mask(response: Response) -> Score:
    return Score(MASK, response)


def token_kl(response: Response) -> Score:
    return Score(TOKEN_KL, response)


def token_weights(response: Response) -> Score:
    return Score(TOKEN_WEIGHTS, response)


def token_value(name: str, response: Response) -> Score:
    return Score(TOKEN_VALUE, response, name=name)


def example_value(name: str) -> Score:
    return Score(EXAMPLE_VALUE, name=name)


@dataclasses.dataclass(frozen=True)
class Option:
    """A method option: its METHODS.md default and the values it may take.

    Attributes:
      default: the default (its type is the option's type).
      choices: the allowed values, if a closed set.
      bounds: inclusive ``(low, high)``, None for an open end.
      positive: must be > 0.
      check: ``value -> problem or None`` for anything else (e.g. a pair's order).
    """

    default: Any
    choices: tuple[Any, ...] | None = None
    bounds: tuple[float | None, float | None] | None = None
    positive: bool = False
    check: Callable[[Any], str | None] | None = None

    def problems(self, path: str, value: Any) -> list[str]:
        """Why ``value`` is not valid for this option (empty when it is)."""
        if self.check is not None:
            problem = self.check(value)
            return [] if problem is None else [f"{path}={value!r}: {problem}"]
        if self.choices is not None:
            return [] if value in self.choices else [f"{path}={value!r} is not one of "
                                                     f"{self.choices}"]
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return []
        if self.positive and not value > 0:
            return [f"{path}={value!r} must be > 0"]
        if self.bounds is not None:
            low, high = self.bounds
            if (low is not None and value < low) or (high is not None and value > high):
                return [f"{path}={value!r} must lie in [{low}, {'inf' if high is None else high}]"]
        return []


Options = Mapping[str, Any]
"""A method's resolved option values (every option its terms and weighting declare)."""
TermResult = tuple[jax.Array, dict[str, Any]]
"""``(losses [B] float32, metrics as (sum, count) pairs)``."""


class Inputs:
    """What a term's loss reads: its options, scored arrays and (weighted) sequence log-probs.

    Args:
      options: the method's resolved options.
      scored: ``{Score: array}``.
      sequence: ``(model, response) -> [B]`` the term's sequence log-probs (weighted as
        configured when the term is weighted).
    """

    def __init__(self, options: Options, scored: Mapping[Score, jax.Array],
                 sequence: Callable[[str, Response], jax.Array]):
        self.options = options
        self._scored = scored
        self._sequence = sequence

    def __getitem__(self, score: Score) -> jax.Array:
        return self._scored[score]

    def sequence(self, model: str, response: Response) -> jax.Array:
        """``[B]`` log-prob of ``response`` under ``model`` (sum, or as ``reduction`` says)."""
        return self._sequence(model, response)


def _nothing(options: Options) -> tuple:
    return ()


@dataclasses.dataclass(frozen=True)
class Term:
    """One objective term (a summand of a method's loss).

    Attributes:
      name: the key of ``method.terms``.
      loss: ``Inputs -> (losses [B] float32, metrics)``; ``loss/<name>`` is the term before its
        weight.
      options: the method options it reads, with their defaults.
      sequences: ``options -> ((model, Response), ...)`` the sequence log-probs it reads.
      reads: ``options -> (Score, ...)`` the other arrays it reads.
      weighted: a configured token weighting applies to its sequences (False: plain sums).
      couples_examples: its per-example losses depend on other examples of the batch (a group
        baseline): the step evaluates it on the whole batch, not per example.
    """

    name: str
    loss: Callable[[Inputs], TermResult]
    options: Mapping[str, Option] = dataclasses.field(default_factory=dict)
    sequences: Callable[[Options], tuple[tuple[str, Response], ...]] = _nothing
    reads: Callable[[Options], tuple[Score, ...]] = _nothing
    weighted: bool = True
    couples_examples: bool = False


@dataclasses.dataclass(frozen=True)
class Weighting:
    """A token weighting: per-token weights ``w_t`` of every response a weighted term reads,
    entering as ``sum_t w_t log pi(y_t)`` on policy and reference alike (and weighting the token
    KL). The engine computes the weights from the reference (``engine.scoring``).

    Attributes:
      name: the value of ``method.token_weights``.
      options: the method options its computation reads.
      reread_on: an image kind on which the reference also reads each weighted response (TPO's
        ``I_noise``), or None.
    """

    name: str
    options: Mapping[str, Option] = dataclasses.field(default_factory=dict)
    reread_on: str | None = None


@dataclasses.dataclass(frozen=True)
class Method:
    """A named composition: default ``{term: weight}`` and token weighting of ``method.name``."""

    name: str
    terms: Mapping[str, float]
    token_weights: str | None = None


def pairs(*responses: Response) -> Callable[[Options], tuple[tuple[str, Response], ...]]:
    """``sequences`` of a term reading each response under the policy and the reference."""
    return lambda options: tuple((model, r) for r in responses for model in (POLICY, REFERENCE))
