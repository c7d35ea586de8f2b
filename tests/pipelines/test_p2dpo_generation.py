"""P2-DPO pair generation end to end on a tiny random model: resume, dataset, pipeline, one step."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import jax
import numpy as np
import pytest

from mmpo_jax.data import pipeline
from mmpo_jax.data.builders.p2dpo_pairs import missing_shards, read_manifest, shard_file, summarize
from mmpo_jax.data.sources import load_split
from mmpo_jax.pipelines import p2dpo_pairs as pairs
from mmpo_jax.pipelines import p2dpo as driver
from mmpo_jax.pipelines.p2dpo import PairSettings, TrainingLayout, generate_pairs
from mmpo_jax.data.fields import IMAGE_KINDS
from mmpo_jax.objectives.p2dpo import PAIRS
from mmpo_jax.config import checks as config_checks
from mmpo_jax.config.loading import load_config
from mmpo_jax.training.loop import train
from mmpo_jax.engine.scoring import plan_scoring, reference_scores
from tests.engine import step_fixtures as fx

pytestmark = pytest.mark.slow

NUM_RECORDS = 8
# The random model's replies fail every perplexity threshold; filter_pairs=() keeps them all
# (the verdicts are still counted) so the dataset has records to train on.
SETTINGS = PairSettings(enhanced_prompt="{prompt}", base_box=32.0, focus_max_new_tokens=4,
                        robust_max_new_tokens=4, batch_size=4, shard_size=4, filter_pairs=())
LAYOUT = TrainingLayout(buckets=(64, 96))
REPLIES = ("chosen", "rejected", "robust_chosen", "robust_rejected")
EXTRAS = ("focus_images", "robust_pair", "ref_logps")


def _generate(output_dir, settings=SETTINGS, **kwargs):
    return generate_pairs(fx.base_model(), fx.tokenizer(), list(fx.records(NUM_RECORDS)),
                          image_config=fx.IMAGE_CONFIG, output_dir=output_dir, settings=settings,
                          layout=LAYOUT, seed=0, progress=False,
                          source_metadata={"world": {"image_size": 64}}, **kwargs)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("p2dpo")
    whole = _generate(root / "whole")
    interrupted = _generate(root / "resumed", stop_after_shards=1)
    with pytest.raises(ValueError, match="unfinished"):
        load_split("p2dpo_pairs", "train", data_dir=root / "unfinished", manual_dir=root / "resumed")
    resumed = _generate(root / "resumed")
    # With the filters on, the random model keeps no pair: preparing says so in one line.
    _generate(root / "filtered", dataclasses.replace(SETTINGS, filter_pairs=tuple(PAIRS)))
    with pytest.raises(ValueError, match=r"kept no pair of its 8 candidates .*SFT base"):
        load_split("p2dpo_pairs", "train", data_dir=root / "filtered_data", manual_dir=root / "filtered")
    return root, whole, interrupted, resumed


def test_a_resumed_generation_writes_the_same_bytes(generated):
    root, whole, interrupted, resumed = generated
    assert missing_shards(interrupted) == [1] and missing_shards(read_manifest(root / "resumed")) == []
    assert whole["shards"] == resumed["shards"]
    for index in range(2):
        assert ((root / "whole" / shard_file(index)).read_bytes()
                == (root / "resumed" / shard_file(index)).read_bytes())
    summary = summarize(whole)
    assert summary["candidates"] == NUM_RECORDS and summary["kept"] == NUM_RECORDS
    assert summary["shards_done"] == "2/2"
    # the ground-truth counts are those of the written records
    truth = Counter()
    for index in range(2):
        for line in (root / "whole" / shard_file(index)).read_text().splitlines():
            record = json.loads(line)
            metadata = json.loads(record["metadata"])
            source = fx.records(NUM_RECORDS)[metadata["source_index"]]
            truth.update(pairs.truth_counts({k: record[k] for k in REPLIES},
                                            pairs.record_objects(source),
                                            metadata["question_object"]))
    assert truth and {k: v for k, v in summary.items() if k.startswith("truth/") and
                      not k.endswith(("chair_i", "accuracy"))} == dict(truth)


def test_a_different_setting_is_refused_and_goes_to_its_own_prepared_copy(generated):
    root, whole, *_ = generated
    with pytest.raises(ValueError, match="other settings"):
        generate_pairs(fx.base_model(), fx.tokenizer(), list(fx.records(NUM_RECORDS)),
                       image_config=fx.IMAGE_CONFIG, output_dir=root / "whole", settings=SETTINGS,
                       layout=LAYOUT, seed=1, progress=False)
    other = generate_pairs(fx.base_model(), fx.tokenizer(), list(fx.records(4)),
                           image_config=fx.IMAGE_CONFIG, output_dir=root / "seed1",
                           settings=SETTINGS, layout=LAYOUT, seed=1, progress=False,
                           source_metadata={"world": {"image_size": 64}})
    # one data_dir holds both generations, each prepared once under its fingerprint
    first = load_split("p2dpo_pairs", "train", data_dir=root / "shared", manual_dir=root / "whole")
    second = load_split("p2dpo_pairs", "train", data_dir=root / "shared", manual_dir=root / "seed1")
    assert (len(first), len(second)) == (NUM_RECORDS, 4)
    assert first.metadata["fingerprint"] == whole["fingerprint"]
    assert second.metadata["fingerprint"] == other["fingerprint"] != whole["fingerprint"]
    assert sorted(p.name for p in (root / "shared" / "p2dpo_pairs_generations").iterdir()) == sorted(
        m["fingerprint"][:16] for m in (whole, other))


def test_dataset_loads_and_the_stored_reference_logps_are_the_trainers(generated):
    root, whole, *_ = generated
    source = load_split("p2dpo_pairs", "train", data_dir=root / "data", manual_dir=root / "whole")
    assert len(source) == NUM_RECORDS
    assert "ddw_clip_crop" not in source.fields  # no CLIP scorer: hidden, the trainer uses 0.5
    assert source.metadata["world"] == {"image_size": 64}
    assert source.tokenizer_path and (root / "data").exists()
    record = source[0]
    assert record["image"].shape == record["focus_aug_image"].shape == (64, 64, 3)
    metadata = json.loads(record["metadata"])
    x0, y0, x1, y1 = metadata["box"]
    assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
    # I_deg is I with the box filled by one (mean) colour; I_aug differs from I.
    erased = record["focus_deg_image"][y0:y1, x0:x1].reshape(-1, 3)
    assert (erased == erased[0]).all()
    assert not np.array_equal(record["focus_aug_image"], record["image"])

    iterator = pipeline.preference_pipeline(
        source, tokenizer=fx.tokenizer(), image_config=fx.IMAGE_CONFIG, num_image_tokens=16,
        batch_size=NUM_RECORDS, buckets=(64, 96), seed=0, shuffle=False, extras=EXTRAS,
        shard_by_process=False)
    batch = next(iterator)
    assert batch.example_mask.all()
    for field in ("focus_aug_pixel_values", "focus_deg_pixel_values", "robust_noise_pixel_values",
                  "robust_chosen_input_ids", "robust_rejected_input_ids", "ref_chosen_logps"):
        assert getattr(batch, field) is not None, field
    plan = plan_scoring(load_config("configs/p2dpo.py").method.to_dict())
    scored = reference_scores(plan, fx.base_model(), jax.tree.map(np.asarray, batch),
                              image_config=fx.IMAGE_CONFIG, eos_token_id=fx.tokenizer().eos_token_id)
    for stored, response, group in ((batch.ref_chosen_logps, "focus_chosen", "chosen"),
                                    (batch.ref_rejected_logps, "focus_rejected", "rejected")):
        mask = np.asarray(getattr(batch, f"{group}_loss_mask"))[:, 1:]  # shift: t predicts t + 1
        logps = np.asarray(scored[f"ref/{response}/token_logps"])[:, :-1]
        np.testing.assert_allclose(stored, (logps * mask).sum(-1), rtol=1e-5, atol=1e-5)


def test_the_robust_pair_is_scored_on_the_very_noise_image_it_was_generated_on(generated):
    root, whole, *_ = generated
    source = load_split("p2dpo_pairs", "train", data_dir=root / "data", manual_dir=root / "whole")
    batch = jax.tree.map(np.asarray, next(pipeline.preference_pipeline(
        source, tokenizer=fx.tokenizer(), image_config=fx.IMAGE_CONFIG, num_image_tokens=16,
        batch_size=NUM_RECORDS, buckets=(64, 96), seed=5, shuffle=False, extras=EXTRAS,
        shard_by_process=False)))
    # what the step reads for the robustness pair: the image kind's batch field
    plan = plan_scoring(load_config("configs/p2dpo.py").method.to_dict())
    (kind,) = {response.image for response in PAIRS["robust"]}
    assert kind in plan.images and not IMAGE_KINDS[kind].per_epoch
    read = getattr(batch, IMAGE_KINDS[kind].field)
    # the pixels generation sampled y_l from: rerun its first batch (records 0-3)
    model, tokenizer = fx.base_model(), fx.tokenizer()
    records = fx.records(NUM_RECORDS)
    layer = pairs.saliency_layer(model.config.text_config.num_hidden_layers, SETTINGS.saliency_depth)
    candidates = driver._generate_candidates(
        model, tokenizer, records[:4], list(range(4)), settings=SETTINGS, layout=LAYOUT,
        image_config=fx.IMAGE_CONFIG, seed=0, layer=layer)
    sources = [json.loads(source[i]["metadata"])["source_index"] for i in range(len(source))]
    for row, index in enumerate(batch.example_index):
        if sources[index] < 4:
            np.testing.assert_array_equal(read[row], candidates.noise[sources[index]])
    assert sum(s < 4 for s in sources) == 4
    # and the trainer's reference log-probs of the pair there are the ones the filter judged
    scored = reference_scores(plan, model, batch, image_config=fx.IMAGE_CONFIG,
                              eos_token_id=tokenizer.eos_token_id)
    for row, index in enumerate(batch.example_index):
        stored = json.loads(source[index]["metadata"])["filter_mean_logps"]["robust"]
        for response, want in zip(PAIRS["robust"], stored):
            mask = np.asarray(getattr(batch, f"{response.tokens}_loss_mask"))[row, 1:]
            logps = np.asarray(scored[f"ref/{response.name}/token_logps"])[row, :-1]
            np.testing.assert_allclose((logps * mask).sum() / mask.sum(), want, rtol=1e-5, atol=1e-6)


def test_one_training_step_of_configs_p2dpo_runs_on_the_generated_pairs(generated, tmp_path):
    root, *_ = generated
    source = load_split("p2dpo_pairs", "train", data_dir=root / "data", manual_dir=root / "whole")
    config = load_config("configs/p2dpo.py", [
        "train.num_steps=1", "train.progress_bar=false", "train.log_every=1",
        f"data.batch_size={NUM_RECORDS}", "checkpoint.async_save=false", "eval.enabled=false",
        f"data.manual_dir={root / 'whole'}", f"data.data_dir={root / 'data'}"])
    config_checks.validate(config, device_count=jax.device_count(), dataset_features=source.fields)
    result = train(config, model=fx.base_model(), tokenizer=fx.tokenizer(), source=source,
                   image_config=fx.IMAGE_CONFIG, workdir=tmp_path)
    assert result.steps == 1
    assert np.isfinite(result.summary["metrics"]["loss/total"]["last"])


def test_two_image_focus_pairs_are_generated_scored_and_trained(tmp_path):
    settings = dataclasses.replace(SETTINGS, combine_mode="two_images", shard_size=4,
                                   enhanced_prompt="answer mainly from the first image: {prompt}")
    generate_pairs(fx.base_model(), fx.tokenizer(), list(fx.records(4)),
                   image_config=fx.IMAGE_CONFIG, output_dir=tmp_path / "pairs", settings=settings,
                   layout=LAYOUT, seed=0, progress=False, source_metadata={"world": {"image_size": 64}})
    source = load_split("p2dpo_pairs", "train", data_dir=tmp_path / "data",
                        manual_dir=tmp_path / "pairs")
    assert source.metadata["combine_mode"] == "two_images"
    with pytest.raises(config_checks.ConfigError, match="differs from pairs.combine_mode"):
        config_checks.validate(load_config("configs/p2dpo.py", ["pairs.combine_mode=two_images"]))
    overrides = ["method.combine_mode=two_images", "pairs.combine_mode=two_images"]
    config = load_config("configs/p2dpo.py", [
        *overrides, "train.num_steps=1", "train.progress_bar=false", "train.log_every=1",
        "data.batch_size=8", "checkpoint.async_save=false", "eval.enabled=false",
        f"data.manual_dir={tmp_path / 'pairs'}", f"data.data_dir={tmp_path / 'data'}"])
    plan = plan_scoring(config.method.to_dict())
    assert "focus_two_images" in plan.pipeline_extras and "focus_aug_prompt" in plan.record_fields
    batch = jax.tree.map(np.asarray, next(pipeline.preference_pipeline(
        source, tokenizer=fx.tokenizer(), image_config=fx.IMAGE_CONFIG, num_image_tokens=16,
        batch_size=4, buckets=(64, 96), seed=0, shuffle=False, extras=plan.pipeline_extras,
        shard_by_process=False)))
    assert batch.focus_pair_pixel_values.shape == (4, 2, 64, 64, 3)
    image_id = fx.base_model().config.image_token_id
    assert ((batch.focus_aug_chosen_input_ids == image_id).sum(1) == 32).all()
    for row in range(4):  # the image, then its crop as the record stores it
        record = source[int(batch.example_index[row])]
        np.testing.assert_array_equal(batch.focus_pair_pixel_values[row, 0], fx.IMAGE_CONFIG(record["image"]))
        np.testing.assert_array_equal(batch.focus_pair_pixel_values[row, 1],
                                      fx.IMAGE_CONFIG(record["focus_aug_image"]))
        x0, y0, x1, y1 = json.loads(record["metadata"])["box"]
        assert record["focus_aug_image"].shape == (y1 - y0, x1 - x0, 3)
        assert record["focus_aug_prompt"].startswith("answer mainly from the first image")
    # the engine reads y_w on both images after P_enh: a direct forward with the two images
    model = fx.base_model()
    scored = reference_scores(plan, model, batch, image_config=fx.IMAGE_CONFIG,
                              eos_token_id=fx.tokenizer().eos_token_id)
    out = model(batch.focus_aug_chosen_input_ids,
                pixel_values=batch.focus_pair_pixel_values.reshape(8, 64, 64, 3),
                attention_mask=batch.focus_aug_chosen_attention_mask)
    logps = jax.nn.log_softmax(np.asarray(out.logits, np.float32), axis=-1)
    labels = batch.focus_aug_chosen_input_ids[:, 1:]
    direct = np.take_along_axis(np.asarray(logps)[:, :-1], labels[..., None], -1)[..., 0]
    mask = batch.focus_aug_chosen_loss_mask[:, 1:]
    got = np.asarray(scored["ref/calib_chosen_two_images/token_logps"])[:, :-1]
    np.testing.assert_allclose(got * mask, direct * mask, rtol=1e-4, atol=1e-5)
    # and one training step of configs/p2dpo.py on them
    config_checks.validate(config, device_count=jax.device_count(), dataset_features=source.fields)
    result = train(config, model=fx.base_model(), tokenizer=fx.tokenizer(), source=source,
                   image_config=fx.IMAGE_CONFIG, workdir=tmp_path / "run")
    assert result.steps == 1
    assert np.isfinite(result.summary["metrics"]["loss/total"]["last"])
    assert np.isfinite(result.summary["metrics"]["loss/calib"]["last"])
