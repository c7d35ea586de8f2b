"""How well FiSAO's verifier rewards separate real from hallucinated objects on the shapes world.

    python scripts/fisao_rewards.py [--set data.data_dir=/tmp/data] [--num-records 300]

Builds (or loads, cached) what ``configs/fisao.py`` trains with: the SFT base, the word-level
CLIP verifier and the calibration ``(mu_c, mu_h)``. Then prints

- the verifier's discrimination on the ``sft`` images it never trained on (every vocabulary
  object scored on every image: mean score of present vs absent objects, AUC);
- on the ``test_caption`` images (seen by neither the verifier nor the calibration), for the
  object mentions in captions the SFT base samples: the fraction of mentions of present objects
  rewarded > 0 and of absent (hallucinated) objects rewarded < 0; the same for every vocabulary
  object, present or absent, as if the policy had named it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib

import jax.numpy as jnp
import numpy as np
from absl import logging as absl_logging

from mmpo_jax.data.sources import load_split
from mmpo_jax.pipelines import fisao, verifier as verifier_lib
from mmpo_jax.rewards.fisao import object_reward
from mmpo_jax.training import experiment, fisao_loop
from mmpo_jax.config.loading import load_config


def _rates(scores_present: np.ndarray, scores_absent: np.ndarray,
           calibration: fisao.Calibration) -> dict[str, float]:
    def reward(scores):
        return np.asarray(object_reward(jnp.asarray(scores), calibration.mu_c, calibration.mu_h))

    return {"present_rewarded_positive": float(np.mean(reward(scores_present) > 0)),
            "absent_rewarded_negative": float(np.mean(reward(scores_absent) < 0)),
            "num_present": int(scores_present.size), "num_absent": int(scores_absent.size)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/fisao.py")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--num-records", type=int, default=300,
                        help="test_caption images to sample captions for")
    args = parser.parse_args()
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mmpo_jax").setLevel(logging.INFO)
    config = load_config(args.config, args.set)
    data_dir = pathlib.Path(os.path.expanduser(config.data.data_dir))
    _, tokenizer, image_config = experiment.load_data(config)
    base = experiment.initial_model(config, tokenizer)
    vocabulary = fisao.object_vocabulary(config.rollout.vocabulary)
    verifier, holdout = fisao_loop.shapes_world_verifier(config, vocabulary, image_config)
    report = {"verifier_on_heldout_sft": verifier_lib.discrimination(
        verifier, holdout, vocabulary.objects, vocabulary.truth)}
    calibration = fisao_loop.policy_calibration(
        config, base, tokenizer, verifier, vocabulary, fisao_loop.calibration_records(holdout),
        image_config=image_config,
        cache_dir=data_dir / "fisao_calibration")
    report["calibration"] = dataclasses.asdict(calibration)
    test = load_split(config.data.dataset, "test_caption",
                      data_dir=data_dir,
                      **config.data.builder.to_dict())
    records = [test[i] for i in range(min(args.num_records, len(test)))]
    correct, hallucinated = fisao.mention_scores(
        base, tokenizer, verifier, vocabulary, records, image_config=image_config,
        num_samples=int(config.rollout.num_samples),
        max_new_tokens=int(config.rollout.max_new_tokens),
        temperature=float(config.rollout.temperature), seed=int(config.seed) + 1)
    report["sampled_mentions_on_test"] = _rates(correct, hallucinated, calibration)
    table = verifier.object_embeddings(vocabulary.objects)
    scores = np.asarray(verifier.image_embeddings(verifier.pixels([r["image"] for r in records]))
                        @ table.T)
    present = np.asarray([[o in vocabulary.truth(r) for o in vocabulary.objects]
                          for r in records])
    report["every_object_on_test"] = _rates(scores[present], scores[~present], calibration)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
