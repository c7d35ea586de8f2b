"""The study's protocol: rows, budgets, the selection grid, seeds, the world and its splits.

Budget: every trained row makes ``updates`` optimizer updates on batches of ``batch_size``
sequences (preference rows: pairs; the control: chosen captions). FiSAO's PPO epochs count: it
runs ``updates / rollout.ppo_epochs`` rollout steps of ``batch_size`` sampled captions
(``batch_size / rollout.num_samples`` prompts), each followed by ``ppo_epochs`` updates over the
whole batch, so it too makes ``updates`` updates of ``batch_size`` sequences.

Grid: every main row's learning rate from ``learning_rates``, and beta from ``betas`` where its
method block has a ``beta`` (FiSAO's ``beta_kl`` is a KL weight, not DPO's beta, and stays at
its default [our choice]). Ablation rows inherit their parent's choice. [our choice] The learning
rates are {1e-4, 2e-4, 5e-4, 1e-3}, found on validation numbers only (v1 world, 2026-12-06),
moving the grid up for every row alike while the rows chose its top: over {5e-6, 1e-5, 2e-5,
5e-5} all six rows selected by then (the control, DPO, DPO+NLL, mDPO, Cat-PO, TPO) chose 5e-5
and 5e-6 never won (ADAPT, half-way, did worse at 1e-5 than at 5e-6); over {1e-5, ..., 1e-4}
the first five chose 1e-4; over {2e-5, ..., 2e-4} and then {5e-5, ..., 5e-4} the first three
(the control, DPO, DPO+NLL) chose the top again. A probe above it bracketed the optimum: DPO
(beta 0.5) has its lowest validation sampled CHAIR_i at 5e-4 (.087; 1e-3: .148; 2e-3: .186 with
recall .52), the control a flat best at 5e-4 to 1e-3 (.107, .104; 2e-3: .115).

Seeds: ``seeds[0]`` is also the selection seed, so its training run is shared by the selection
(evaluated on validation) and the test evaluation [our choice: saves one training per row; the
test splits are independent of the choice either way]. The SFT base is one model (seed
``base_seed``) shared by every row and seed; a seed changes the run's data order, its stochastic
inputs (crops, noise, rollouts) and the sampled decoding of its evaluation.

Splits: a world with validation splits (v2: ``validation_caption`` / ``validation_pope``) uses
them. [our choice] v1 has none: its validation splits are the ``test_*`` splits of the same world
with ``seed`` moved by ``VALIDATION_SEED_OFFSET`` (and one-record training splits: TFDS
refuses empty ones) — v1 draws every
record from a generator seeded by ``(seed, split, index)``, so they are an independent sample of
the same distribution, and never records of the study's own test splits.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from mmpo_jax.config.loading import load_config
from mmpo_jax.config.schema import OPTIONAL_SECTIONS
from mmpo_jax.data.builders.shapes_world import WORLDS
from mmpo_jax.evidence import rows as rows_lib

VALIDATION = "validation"
TEST = "test"
VALIDATION_SEED_OFFSET = 1000
LEARNING_RATES = (1e-4, 2e-4, 5e-4, 1e-3)
"""The selection grid's learning rates (module doc: how they were found)."""
BETAS = (0.1, 0.5)
WORLD_PRESETS = {"v1": "tiny", "v2": "tiny_v2"}
"""The model preset a world needs unless ``--set model.preset=...`` says otherwise."""
WORLD_CONFIGS = {"v2": "shapes_world_v2.py:{stem}"}
"""The config file that holds a world's sections for the method file ``<stem>.py`` (v2's data
buckets, its SFT base's recipe, P2-DPO's two-image ``I_aug``); other worlds read ``<stem>.py``."""


@dataclasses.dataclass(frozen=True)
class Splits:
    """The caption and POPE splits one evaluation reads, and the world options they come from."""

    role: str
    caption: str
    pope: str
    builder: Mapping[str, Any]

    def overrides(self) -> tuple[str, ...]:
        return (f"eval.caption_split={self.caption}", f"eval.pope_split={self.pope}",
                f"data.builder={dict(self.builder)!r}")

    def identity(self) -> dict[str, Any]:
        return {"role": self.role, "caption": self.caption, "pope": self.pope,
                "builder": dict(sorted(self.builder.items()))}


def world_name(world: Mapping[str, Any]) -> str:
    return str(world.get("world", "v1"))


def _spec_fields(world: Mapping[str, Any]) -> set[str]:
    name = world_name(world)
    if name not in WORLDS:
        raise ValueError(f"unknown shapes world {name!r}; valid: {sorted(WORLDS)}")
    return {field.name for field in dataclasses.fields(WORLDS[name])}


def validation_splits(world: Mapping[str, Any]) -> Splits:
    """The splits settings are chosen on (module doc); never a test split of ``world``."""
    if "validation_caption_size" in _spec_fields(world):
        return Splits(VALIDATION, "validation_caption", "validation_pope", dict(world))
    default_seed = WORLDS[world_name(world)]().seed
    shifted = {**world, "seed": int(world.get("seed", default_seed)) + VALIDATION_SEED_OFFSET,
               "sft_size": 1, "preference_size": 1}
    return Splits(VALIDATION, "test_caption", "test_pope", shifted)


def test_splits(world: Mapping[str, Any]) -> Splits:
    return Splits(TEST, "test_caption", "test_pope", dict(world))


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Everything that decides the study's numbers (recorded at the top of ``EVIDENCE.md``).

    Attributes:
      rows: row keys (`rows.with_dependencies` adds what they need).
      seeds: training seeds at the chosen settings; the first also selects.
      learning_rates, betas: the selection grid.
      updates, batch_size: every trained row's budget (module doc).
      world: shapes-world builder options (``world="v2"`` for v2; ``{}``: the default world).
      overrides: config overrides applied to every run (``--set``), after the world's; one
        naming an optional section applies to the runs whose config has it.
      recall_tolerance: a setting is eligible when its validation sampled recall is at least the
        base's minus this.
      base_seed: the seed of the one SFT base.
      bootstrap_samples: resamples of each paired interval.
      logp_records: preference records whose chosen / rejected log-probabilities are compared
        before and after training.
      configs: the directory of the config files.
    """

    rows: tuple[str, ...] = tuple(rows_lib.ROWS)
    seeds: tuple[int, ...] = (0, 1, 2)
    learning_rates: tuple[float, ...] = LEARNING_RATES
    betas: tuple[float, ...] = BETAS
    updates: int = 200
    batch_size: int = 32
    world: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    recall_tolerance: float = 0.02
    base_seed: int = 0
    bootstrap_samples: int = 2000
    logp_records: int = 256
    configs: str = "configs"

    def __post_init__(self) -> None:
        object.__setattr__(self, "rows", rows_lib.with_dependencies(tuple(self.rows)))
        problems = [f"{name} is empty" for name in ("seeds", "learning_rates", "betas")
                    if not getattr(self, name)]
        problems += [f"{name}={getattr(self, name)} must be >= 1" for name in
                     ("updates", "batch_size", "bootstrap_samples", "logp_records")
                     if getattr(self, name) < 1]
        if problems:
            raise ValueError("evidence protocol: " + "; ".join(problems))
        _spec_fields(self.world)  # an unknown world is named here

    @property
    def selection_seed(self) -> int:
        return self.seeds[0]

    def world_overrides(self) -> tuple[str, ...]:
        preset = () if any(o.startswith("model.preset=") for o in self.overrides) else (
            f"model.preset={WORLD_PRESETS.get(world_name(self.world), 'tiny')}",)
        return (f"data.builder={dict(self.world)!r}", *preset)

    def world_config(self, seed: int | None = None, extra: Sequence[str] = ()
                     ) -> ml_collections.ConfigDict:
        """The config of the SFT base and of every evaluation: the world's ``sft.py`` sections
        (`config_path`) with the world, the common overrides and ``extra`` (an evaluation's
        `Splits`)."""
        seed = self.base_seed if seed is None else seed
        path = self.config_path("sft")
        return load_config(path, (*self.world_overrides(), *self.common_overrides(load_config(path)),
                                  f"seed={seed}", *extra))

    def config_path(self, stem: str) -> str:
        """The config of method file ``<stem>.py`` in this world (``WORLD_CONFIGS``)."""
        name = WORLD_CONFIGS.get(world_name(self.world), "{stem}.py").format(stem=stem)
        return str(pathlib.Path(self.configs, name))

    def common_overrides(self, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        """``overrides`` that apply to ``config``: one naming an optional section (``pairs``,
        ``rollout``, ``benchmarks``) applies only to configs that have that section."""
        return tuple(o for o in self.overrides
                     if o.split("=", 1)[0].split(".", 1)[0] in config
                     or o.split(".", 1)[0] not in OPTIONAL_SECTIONS)

    def budget_overrides(self, config: ml_collections.ConfigDict) -> tuple[str, ...]:
        """The budget of the module doc for ``config``'s method."""
        steps = self.updates
        if config.method.name == "fisao":
            epochs = int(config.rollout.ppo_epochs)
            if self.updates % epochs:
                raise ValueError(f"updates={self.updates} is not a multiple of FiSAO's "
                                 f"rollout.ppo_epochs={epochs}")
            steps = self.updates // epochs
        return (f"train.num_steps={steps}", f"data.batch_size={self.batch_size}",
                "data.num_epochs=0")

    def grid(self, row: rows_lib.Row) -> list[dict[str, float]]:
        """The settings a tuned row is trained at during selection, in grid order."""
        has_beta = "beta" in self.row_config(row, {}, self.selection_seed, data_root=None).method
        return [{"learning_rate": lr, **({"beta": beta} if has_beta else {})}
                for lr in self.learning_rates for beta in (self.betas if has_beta else (None,))]

    def row_config(self, row: rows_lib.Row, settings: Mapping[str, float], seed: int, *,
                   data_root: pathlib.Path | None) -> ml_collections.ConfigDict:
        """The full training config of ``row`` at ``settings`` and ``seed``.

        ``data_root``: where generated training data of this world and base goes (P2-DPO's
        pairs); None leaves the file's value (for reading the method block only).
        """
        if not row.trains:
            raise ValueError(f"row {row.key!r} trains nothing; it has no training config")
        path = self.config_path(row.config)
        file_config = load_config(path)
        world = [f"pairs.source_builder={dict(self.world)!r}"
                 if file_config.data.dataset == "p2dpo_pairs" else f"data.builder={dict(self.world)!r}"]
        world += list(self.world_overrides()[1:])
        if file_config.data.dataset == "p2dpo_pairs" and data_root is not None:
            world.append(f"data.manual_dir={data_root / 'p2dpo_pairs'}")
        chosen = [f"optimizer.learning_rate={settings['learning_rate']!r}"] if settings else []
        if "beta" in settings:
            chosen.append(f"method.beta={settings['beta']!r}")
        overrides = (*world, *self.common_overrides(file_config), *row.overrides, *self.budget_overrides(file_config),
                     *chosen, f"seed={seed}", "train.progress_bar=false", "eval.control=false")
        return load_config(path, overrides)

    def to_dict(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields["world"] = dict(self.world)
        return fields


def quick(**changes: Any) -> Protocol:
    """``--quick``: one seed, the control, DPO and Cat-PO, the full grid's two middle learning
    rates, its first beta."""
    return Protocol(**{"rows": ("control", "dpo", "catpo"), "seeds": (0,),
                       "learning_rates": LEARNING_RATES[1:3], "betas": BETAS[:1], **changes})


def parse_rows(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"dpo,catpo"`` -> ``("dpo", "catpo")``; ``"all"`` -> every row."""
    keys = [k.strip() for k in (text.split(",") if isinstance(text, str) else text) if k.strip()]
    return tuple(rows_lib.ROWS) if keys == ["all"] else tuple(keys)
