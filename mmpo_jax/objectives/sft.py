"""Supervised fine-tuning on the chosen responses: the ``nll`` term and the ``sft`` method.

``L_nll = -logp_theta(y_w | I, x)``, as the per-token mean over the chosen response by default
**[our choice]** (``nll_reduction="sum"`` gives the sum). It is never token-weighted. ``sft`` is
the control row of every evaluation table (the chosen responses alone, no preference); ``nll``
composes with any preference method (e.g. DPO + NLL).
"""

from __future__ import annotations

import jax

from mmpo_jax.objectives import terms
from mmpo_jax.objectives.logprobs import REDUCTIONS, sequence_logps
from mmpo_jax.objectives.metrics import mean_metric
from mmpo_jax.objectives.terms import CHOSEN, POLICY, Inputs, Method, Option, Term, TermResult

_READS = (terms.token_logps(POLICY, CHOSEN), terms.mask(CHOSEN))


def _nll_term(inputs: Inputs) -> TermResult:
    losses = -sequence_logps(*(inputs[score] for score in _READS),
                             reduction=inputs.options["nll_reduction"])
    return losses, {"loss/nll": mean_metric(jax.lax.stop_gradient(losses))}


DECLARATIONS = (
    Term("nll", _nll_term, {"nll_reduction": Option("mean", choices=REDUCTIONS)},
         reads=lambda options: _READS, weighted=False),
    Method("sft", {"nll": 1.0}),
)
