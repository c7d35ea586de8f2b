"""What two methods see on one test image, computed as training computes it, for the heat maps.

- Cat-PO's token weights over a caption: the reference's (the SFT base's) weights of the chosen
  response, ``engine.scoring.reference_scores`` with Cat-PO's method block
  (``configs/catpo.py``).
- ADAPT's anchor over the image: the refined mask of ``I_VE`` the reference derives from the
  caption's first tokens (``engine.scoring.enhancement_mask``, ``configs/adapt.py``'s options).

The caption is the SFT base's own greedy caption of the image (from its test evaluation), as a
preference pair whose chosen and rejected sides are that caption. `cached` stores the result
beside the runs, so a resumed study does not recompile the two probes.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any

import jax
import numpy as np
from flax import nnx

from mmpo_jax.config.loading import load_config
from mmpo_jax.data.batch import shift_for_next_token
from mmpo_jax.data.fields import ORIGINAL
from mmpo_jax.data.pipeline import preference_pipeline
from mmpo_jax.engine.scoring import enhancement_mask, plan_scoring, reference_scores
from mmpo_jax.evidence.runs import Study, digest
from mmpo_jax.objectives import terms as terms_lib


@dataclasses.dataclass(frozen=True)
class Probes:
    """One image's heat-map data."""

    image: np.ndarray  # uint8 [H, W, 3]
    caption: str
    tokens: list[str]
    weights: np.ndarray  # [T_response] Cat-PO weight of each response token (EOS last)
    anchor_mask: np.ndarray  # [H, W] in [0, 1]


def _batch(study: Study, record: dict[str, Any], caption: str, extras: tuple[str, ...]) -> Any:
    pair = {"id": "probe", "image": record["image"], "prompt": record["prompt"],
            "chosen": caption, "rejected": caption, "metadata": "{}"}
    batches = preference_pipeline([pair], tokenizer=study.tokenizer, image_config=study.image_config,
                                  num_image_tokens=study.base.config.num_image_tokens, batch_size=1,
                                  buckets=tuple(study.protocol.world_config().data.buckets), seed=0,
                                  shuffle=False, extras=extras)
    return jax.tree.map(jax.numpy.asarray, next(iter(batches)))


def compute(study: Study, record: dict[str, Any], caption: str) -> Probes:
    configs = pathlib.Path(study.protocol.configs)
    catpo = load_config(str(configs / "catpo.py")).method
    plan = plan_scoring(catpo)
    batch = _batch(study, record, caption, plan.pipeline_extras)
    scores = nnx.jit(lambda model, batch: reference_scores(
        plan, model, batch, image_config=study.image_config,
        eos_token_id=study.tokenizer.eos_token_id))(study.base, batch)  # jitted: eager is ~40 s
    # scored arrays sit at the positions predicting each token (engine.scoring.response_mask)
    _, labels, mask = (np.asarray(x[0]) for x in shift_for_next_token(batch.chosen_input_ids,
                                                                       batch.chosen_loss_mask))
    weights = np.asarray(scores[terms_lib.token_weights(terms_lib.CHOSEN).key][0])[mask.astype(bool)]
    tokens = study.tokenizer.convert_ids_to_tokens(labels[mask.astype(bool)].tolist())
    adapt = load_config(str(configs / "adapt.py")).method
    threshold = float(adapt.mask_threshold_percentile) or None

    @nnx.jit
    def anchor_mask(model: Any, batch: Any) -> jax.Array:
        visual = {ORIGINAL: model.multi_modal_projector(model.image_features(batch.pixel_values))}
        return enhancement_mask(model, batch, visual, anchor_steps=int(adapt.anchor_steps),
                                threshold_percentile=threshold)

    anchor = anchor_mask(study.base, batch)
    return Probes(np.asarray(record["image"]), caption, list(tokens), weights,
                  np.asarray(anchor[0]))


def cached(study: Study, record: dict[str, Any], caption: str) -> Probes:
    """`compute`, stored under ``<cache>/probes/`` by the SFT base, the record and the caption."""
    key = digest({"base": study.base_digest, "record": record["id"], "caption": caption})
    path = study.cache / "probes" / f"{key}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return Probes(stored["image"], str(stored["caption"]), stored["tokens"].tolist(),
                          stored["weights"], stored["anchor_mask"])
    probes = compute(study, record, caption)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}.partial.npz")
    np.savez(partial, image=probes.image, caption=probes.caption, tokens=np.asarray(probes.tokens),
             weights=probes.weights, anchor_mask=probes.anchor_mask)
    os.replace(partial, path)
    return probes
