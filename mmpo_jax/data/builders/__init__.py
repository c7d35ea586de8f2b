"""TFDS builders of every dataset, registered under stable names (importing this package
registers them with TFDS): `shapes_world`, `rlhf_v`, `vlfeedback`, `rlaif_v`, `generic_jsonl`, `p2dpo_pairs`."""

from mmpo_jax.data.builders.generic_jsonl import GenericJsonl
from mmpo_jax.data.builders.p2dpo_pairs import P2dpoPairs
from mmpo_jax.data.builders.records import BadRecordError
from mmpo_jax.data.builders.rlaif_v import RlaifV
from mmpo_jax.data.builders.rlhf_v import RlhfV
from mmpo_jax.data.builders.shapes_world import ShapesWorld
from mmpo_jax.data.builders.vlfeedback import Vlfeedback

BUILDERS = {builder.name: builder for builder in (ShapesWorld, RlhfV, Vlfeedback, RlaifV, GenericJsonl, P2dpoPairs)}

__all__ = ["BUILDERS", "BadRecordError", "GenericJsonl", "P2dpoPairs", "RlaifV", "RlhfV", "ShapesWorld", "Vlfeedback"]
