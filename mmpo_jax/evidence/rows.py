"""The rows of the evidence table and the papers' claims, as data.

A row is a config file plus overrides (a trained row), the SFT base itself, or a view of another
row's model under one of ADAPT's decodings. Main rows have their learning rate (and beta, where
the method has one) chosen on validation (`selection`); ablation rows inherit their parent's
chosen settings and change one thing; decoding rows train nothing.

[our choice] DPO+NLL weighs the chosen response's per-token-mean NLL by 1.0 (RPO's setting); the
composition none of the papers tried is Cat-PO's token weights and token KL with mDPO's CoPO and
anchor terms, expressible with the objective declarations alone (``objectives.registry``: a
configured weighting applies to every weighted term, CoPO and the anchor included).
"""

from __future__ import annotations

import dataclasses

BASE = "base"
CONTROL = "control"
DPO = "dpo"
ADAPT_DECODINGS = ("adapt_steer", "adapt_blend", "adapt_mask")


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the study.

    Attributes:
      key: its name on the command line (``--methods``) and in ``results.json``.
      label: its name in the tables.
      config: the config file's stem (``configs/<config>.py``); None for rows that train nothing.
      overrides: config overrides (``key=value``) on top of the file.
      parent: an ablation's row, whose chosen settings it inherits (not tuned itself).
      model_of: a decoding row's source row (whose model is decoded), e.g. ``"base"``.
      decoding: whose metrics are the row's: ``"greedy"`` (with ``sampled/*``) or an ADAPT mode.
      group: ``"main"``, ``"ablation"`` or ``"decoding"``.
    """

    key: str
    label: str
    config: str | None = None
    overrides: tuple[str, ...] = ()
    parent: str | None = None
    model_of: str | None = None
    decoding: str = "greedy"
    group: str = "main"

    @property
    def trains(self) -> bool:
        return self.config is not None

    @property
    def tuned(self) -> bool:
        """Whether the row's settings are chosen on validation (a trained main row)."""
        return self.trains and self.parent is None


def _ablation(key: str, label: str, parent: Row, *overrides: str) -> Row:
    return Row(key, label, parent.config, parent.overrides + overrides, parent=parent.key,
               group="ablation")


_CATPO = Row("catpo", "Cat-PO", "catpo")
_MDPO = Row("mdpo", "mDPO", "mdpo")
_ADAPT = Row("adapt", "ADAPT (VAG-DPO)", "adapt")
_P2DPO = Row("p2dpo", "P2-DPO", "p2dpo")
_FISAO = Row("fisao", "FiSAO", "fisao")

MAIN_ROWS = (
    Row(BASE, "SFT base"),
    Row(CONTROL, "control (SFT on chosen)", "sft"),
    Row(DPO, "DPO", "dpo"),
    Row("dpo_nll", "DPO+NLL", "dpo", ("method.terms={'dpo': 1.0, 'nll': 1.0}",)),
    _MDPO, _CATPO,
    Row("tpo", "TPO", "tpo"),
    _ADAPT, _P2DPO, _FISAO,
    Row("catpo_mdpo", "Cat-PO weights + CoPO + anchor", "catpo",
        ("method.terms={'dpo': 1.0, 'token_kl': 0.03, 'copo': 1.0, 'anchor': 1.0}",)),
)

ABLATION_ROWS = (
    _ablation("catpo_attention", "Cat-PO attention only (alpha=1)", _CATPO, "method.alpha=1.0"),
    _ablation("catpo_similarity", "Cat-PO similarity only (alpha=0)", _CATPO, "method.alpha=0.0"),
    _ablation("catpo_no_kl", "Cat-PO without token KL", _CATPO,
              "method.terms={'dpo': 1.0, 'token_kl': 0.0}"),
    _ablation("mdpo_no_copo", "mDPO without CoPO", _MDPO,
              "method.terms={'dpo': 1.0, 'copo': 0.0, 'anchor': 1.0}"),
    _ablation("mdpo_no_anchor", "mDPO without anchor", _MDPO,
              "method.terms={'dpo': 1.0, 'copo': 1.0, 'anchor': 0.0}"),
    _ablation("p2dpo_no_feps", "P2-DPO w/o FEPs", _P2DPO, "method.branches=('robust',)"),
    _ablation("p2dpo_no_vrps", "P2-DPO w/o VRPs", _P2DPO, "method.branches=('focus',)"),
    _ablation("fisao_sentence", "FiSAO sentence-level rewards", _FISAO,
              "rollout.reward_granularity=sentence"),
)

DECODING_ROWS = tuple(
    Row(f"{decoding}_{source}", f"ADAPT {decoding.removeprefix('adapt_')} decoding ({name})",
        model_of=source, decoding=decoding, group="decoding")
    for source, name in ((BASE, "SFT base"), (_ADAPT.key, "VAG-DPO")) for decoding in ADAPT_DECODINGS)

ROWS = {row.key: row for row in MAIN_ROWS + ABLATION_ROWS + DECODING_ROWS}
"""Every row by key, in table order."""


@dataclasses.dataclass(frozen=True)
class Claim:
    """A paper's claim as comparisons: each ``(better, worse)`` pair of row keys says the first
    hallucinates less (lower sampled CHAIR_i, or greedy for decoding rows)."""

    key: str
    title: str
    comparisons: tuple[tuple[str, str], ...]

    @property
    def rows(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(key for pair in self.comparisons for key in pair))


CLAIMS = (
    Claim("catpo", "Cat-PO: both relevance signals and the token KL help, and it beats flat DPO",
          (("catpo", "catpo_attention"), ("catpo", "catpo_similarity"), ("catpo", "catpo_no_kl"),
           ("catpo", DPO))),
    Claim("mdpo", "mDPO: CoPO and the anchor each help",
          (("mdpo", "mdpo_no_copo"), ("mdpo", "mdpo_no_anchor"))),
    Claim("adapt", "ADAPT: each decoding mode hallucinates less than greedy decoding",
          tuple((f"{decoding}_{source}", source) for source in (BASE, "adapt")
                for decoding in ADAPT_DECODINGS)),
    Claim("p2dpo", "P2-DPO: both pair kinds help",
          (("p2dpo", "p2dpo_no_feps"), ("p2dpo", "p2dpo_no_vrps"))),
    Claim("fisao", "FiSAO: token-level rewards beat sentence-level ones",
          (("fisao", "fisao_sentence"),)),
)


def with_dependencies(keys: tuple[str, ...]) -> tuple[str, ...]:
    """``keys`` plus every row they need (base, control and DPO always; an ablation's parent; a
    decoding row's source), in table order; unknown keys raise naming the valid ones."""
    unknown = sorted(set(keys) - set(ROWS))
    if unknown:
        raise ValueError(f"unknown row(s) {unknown}; valid: {sorted(ROWS)}")
    wanted = {BASE, CONTROL, DPO, *keys}
    for key in keys:
        row = ROWS[key]
        wanted.update(filter(None, (row.parent, row.model_of)))
    return tuple(key for key in ROWS if key in wanted)
