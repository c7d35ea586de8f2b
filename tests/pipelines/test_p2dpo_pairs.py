"""P2-DPO pair generation, batch math: saliency gradient, crop boxes, filter selection, prompts."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from mmpo_jax.data import (example_randomness, image_processing, shapes_world, shapes_world_v2,
                           shapes_world_v2_splits)
from mmpo_jax.data.builders.p2dpo_pairs import summarize
from mmpo_jax.models.attention import AttentionHooks, ProbeSpec
from mmpo_jax.models.llava import image_token_positions
from mmpo_jax.objectives.p2dpo import PAIRS
from mmpo_jax.pipelines import p2dpo as driver
from mmpo_jax.generation.prompts import left_padded_prompts
from mmpo_jax.pipelines import p2dpo_pairs as pairs
from mmpo_jax.rewards.p2dpo import saliency_map, saliency_objective
from tests.engine import step_fixtures as fx


def _prompts(count: int = 4):
    records = fx.records(count)
    prompts = [pairs.focus_prompt(r, i, question_fraction=0.5, seed=0)[0] for i, r in enumerate(records)]
    input_ids, mask = left_padded_prompts(fx.tokenizer(), prompts, num_image_tokens=16,
                                          template="llava_1_5")
    pixels = np.stack([fx.IMAGE_CONFIG(r["image"]) for r in records])
    return input_ids, mask, pixels


def _reference_saliency(model, input_ids, mask, pixels, layer, mode):
    """dL/dA through an edit of the WHOLE [B, H, T, T] probability tensor, read afterwards."""
    batch, length = input_ids.shape
    heads = model.config.text_config.num_attention_heads

    def objective(delta):
        hooks = AttentionHooks((layer,), post_softmax_edit=lambda probs, is_image, index: probs + delta)
        out = model(input_ids, pixel_values=pixels, attention_mask=mask,
                    probe=ProbeSpec((layer,), "full"), hooks=hooks)
        return saliency_objective(out.logits[:, -1]), out.probes[layer]

    zeros = jnp.zeros((batch, heads, length, length), jnp.float32)
    (_, probs), grad = jax.value_and_grad(objective, has_aux=True)(zeros)
    positions = image_token_positions(jnp.asarray(input_ids), model.config.image_token_id)
    take = lambda x: jnp.take_along_axis(x, positions[:, None, None, :], axis=-1)
    query = jnp.full((batch,), length - 1)
    return saliency_map(take(probs), query, mode=mode, attention_grad=take(grad))


@pytest.mark.parametrize("mode", ["grad_attention", "attention"])
def test_saliency_matches_the_gradient_of_the_full_attention_tensor(mode):
    model = fx.base_model()
    input_ids, mask, pixels = _prompts()
    assert not mask.all()  # left padding present: the last row is still the last prompt token
    got = pairs.saliency_maps(model, input_ids, mask, pixels, layer=1, mode=mode)
    want = _reference_saliency(model, input_ids, mask, pixels, 1, mode)
    assert got.shape == (4, 4, 4)
    assert float(jnp.max(got)) > 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-9)


def test_saliency_layer_is_the_reference_depth():
    assert pairs.saliency_layer(32, 14 / 32) == 14
    assert pairs.saliency_layer(2, 14 / 32) == 1
    with pytest.raises(ValueError, match="depth"):
        pairs.saliency_layer(2, 1.5)


@pytest.mark.parametrize("row, col", [(0, 0), (1, 2), (3, 3), (2, 0)])
def test_crop_box_lies_in_the_image_and_centres_on_a_synthetic_peak(row, col):
    saliency = np.full((1, 4, 4), 0.01)
    saliency[0, row, col] = 1.0
    (box,) = pairs.crop_boxes(saliency, [(64, 64)], image_config=fx.IMAGE_CONFIG, base_box=32,
                              ratios=(1, 1.2, 1.4, 1.6, 1.8, 2))
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
    peak_x, peak_y = 16 * col + 8, 16 * row + 8  # centre of the peak block
    assert x0 <= peak_x < x1 and y0 <= peak_y < y1
    # The box is centred on the peak unless clamped by the border (then it touches the border).
    centre_x, centre_y = (x0 + x1) / 2, (y0 + y1) / 2
    assert abs(centre_x - peak_x) <= 8 or x0 == 0 or x1 == 64
    assert abs(centre_y - peak_y) <= 8 or y0 == 0 or y1 == 64


def test_crop_box_maps_the_padded_square_view_back_into_a_wide_image():
    config = image_processing.tiny(64)  # pad_to_square: a 96x48 image is seen as a 96x96 square
    saliency = np.full((1, 4, 4), 0.01)
    saliency[0, 2, 3] = 1.0  # block (row 2, col 3) of the square: x in [72, 96), y in [48, 72)
    (box,) = pairs.crop_boxes(saliency, [(96, 48)], image_config=config, base_box=24,
                              ratios=(1.0,))
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 48
    # In image rows the peak block sits at y in [24, 48) (the square's top 24 rows are padding).
    assert x0 <= 84 < x1 and y0 <= 36 <= y1


def test_base_box_fraction_scales_the_box_with_the_image_side():
    """Half the side: the box of base_box=32 on a 64-px image and of 64 on a 128-px one; on a
    96x48 image seen as a padded 96-px square, 48 px (the square's side, not the image's height)."""
    rng = np.random.default_rng(1)
    ratios = (1, 1.2, 1.4, 1.6, 1.8, 2)
    for side in (64, 128):
        config = image_processing.tiny(side)
        saliency = rng.random((16, 8, 8))
        want = pairs.crop_boxes(saliency, [(side, side)] * 16, image_config=config,
                                base_box=side / 2, ratios=ratios)
        got = pairs.crop_boxes(saliency, [(side, side)] * 16, image_config=config, base_box=1000.0,
                               base_box_fraction=0.5, ratios=ratios)
        np.testing.assert_array_equal(got, want)
        assert (want[:, 2] - want[:, 0]).min() >= side // 2  # and the boxes are not the full image
        assert (want[:, 2] - want[:, 0]).max() < side
    config = image_processing.tiny(64)
    saliency = rng.random((4, 4, 4))
    np.testing.assert_array_equal(
        pairs.crop_boxes(saliency, [(96, 48)] * 4, image_config=config, base_box=0.0,
                         base_box_fraction=0.5, ratios=(1.0,)),
        pairs.crop_boxes(saliency, [(96, 48)] * 4, image_config=config, base_box=48, ratios=(1.0,)))
    with pytest.raises(ValueError, match="base_box_fraction"):
        driver.PairSettings(base_box_fraction=1.5)


def test_random_saliency_boxes_stay_inside_the_image():
    rng = np.random.default_rng(0)
    saliency = rng.random((32, 4, 4))
    sizes = [tuple(int(v) for v in rng.integers(20, 200, size=2)) for _ in range(32)]
    for config in (image_processing.tiny(64), image_processing.ImageProcessorConfig(size=64, crop_size=64)):
        boxes = pairs.crop_boxes(saliency, sizes, image_config=config, base_box=48,
                                 ratios=(1, 1.5, 2))
        for (x0, y0, x1, y1), (width, height) in zip(boxes, sizes):
            assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height


def _scored(chosen_means, rejected_means, length=4, empty=()):
    """Hand-made per-token log-probs: row i's response has ``length`` tokens of the given mean."""
    def rows(means):
        logps = np.repeat(np.asarray(means, np.float32)[:, None], 6, axis=1)
        mask = np.zeros_like(logps, np.int32)
        mask[:, 1:1 + length] = 1
        mask[list(empty)] = 0
        return logps, mask

    scored = {}
    for pair in PAIRS.values():
        for response, means in zip(pair, (chosen_means, rejected_means)):
            scored[f"{response.name}/token_logps"], scored[f"{response.name}/mask"] = rows(means)
    return scored


def test_filters_drop_exactly_the_pairs_outside_the_thresholds():
    low, high, max_ppl = -0.174, 0.208, 2.5
    ppl_edge = -float(np.log(max_ppl))  # mean log-prob of perplexity exactly 2.5
    chosen = [-0.30, -0.30, -0.30, -0.30, ppl_edge - 0.01, ppl_edge + 0.02, -0.30, -0.50]
    rejected = [-0.40, -0.30 - high + 0.002, -0.30 - high - 0.002, -0.30 - low + 0.002,
                -0.30, ppl_edge + 0.02, -0.30, -0.50]
    scored = _scored(chosen, rejected, empty=(6,))
    texts = {group: [f"reply {i}" for i in range(8)] for group in ("chosen", "robust_chosen")}
    texts.update(rejected=[f"other {i}" for i in range(8)],
                 robust_rejected=[f"other {i}" for i in range(7)] + ["reply 7"])
    verdicts = pairs.judge_pairs(scored, texts, max_perplexity=max_ppl, margin_range=(low, high))
    #             margin 0.1 | 0.206 | 0.210 | -0.176 | ppl>2.5 | ppl<2.5, margin 0 | empty | kept
    expected = ["kept", "kept", "margin", "margin", "perplexity", "kept", "empty", "kept"]
    assert [pairs.FILTER_REASONS[r] for r in verdicts["focus"].reason] == expected
    assert verdicts["focus"].reasons() == expected
    assert verdicts["robust"].reasons() == expected
    assert verdicts["robust"].reasons(drop_identical=True) == expected[:7] + ["identical"]
    for verdict in verdicts.values():
        assert [pairs.FILTER_REASONS[r] for r in verdict.reason] == expected
        np.testing.assert_allclose(verdict.sums[0][:6], 4 * np.asarray(chosen[:6]), rtol=1e-6)
        np.testing.assert_allclose(verdict.means[1][:6], rejected[:6], rtol=1e-6)
    kept, stats = pairs.select_records(verdicts, [None] * 7 + ["prompt_too_long"], ("focus", "robust"))
    assert kept == [0, 1, 5]
    assert stats == {"kept": 3, "focus/margin": 2, "robust/margin": 2, "focus/perplexity": 1,
                     "robust/perplexity": 1, "focus/empty": 1, "robust/empty": 1,
                     "dropped/prompt_too_long": 1}
    kept, stats = pairs.select_records(verdicts, [None] * 8, ("focus", "robust"))
    assert kept == [0, 1, 5, 7] and stats["robust/identical_texts"] == 1
    kept, stats = pairs.select_records(verdicts, [None] * 8, ("focus", "robust"), drop_identical=True)
    assert kept == [0, 1, 5] and stats["robust/identical"] == 1
    assert pairs.select_records(verdicts, [None] * 8, ("focus",), drop_identical=True)[0] == [0, 1, 5, 7]


def test_only_the_configured_pairs_are_filtered():
    focus = _scored([-0.3, -0.3], [-0.3, -0.9])
    robust = _scored([-0.9, -0.3], [-0.3, -0.3])
    scored = {k: (robust if k.startswith("robust") else focus)[k] for k in focus}
    texts = {group: [f"{group} {i}" for i in range(2)]
             for group in ("chosen", "rejected", "robust_chosen", "robust_rejected")}
    verdicts = pairs.judge_pairs(scored, texts, max_perplexity=2.5, margin_range=(-0.174, 0.208))
    assert [pairs.FILTER_REASONS[r] for r in verdicts["focus"].reason] == ["kept", "margin"]
    assert [pairs.FILTER_REASONS[r] for r in verdicts["robust"].reason] == ["margin", "kept"]
    assert pairs.select_records(verdicts, [None, None], ("focus",))[0] == [0]
    assert pairs.select_records(verdicts, [None, None], ("robust",))[0] == [1]
    assert pairs.select_records(verdicts, [None, None], ())[0] == [0, 1]


def test_focus_prompts_ask_about_an_object_of_the_image_deterministically():
    records = fx.records(16)
    prompts = [pairs.focus_prompt(r, i, question_fraction=0.5, seed=3) for i, r in enumerate(records)]
    assert prompts == [pairs.focus_prompt(r, i, question_fraction=0.5, seed=3)
                       for i, r in enumerate(records)]
    questions = [(p, target) for p, target in prompts if target is not None]
    assert 0 < len(questions) < 16
    for prompt, target in questions:
        assert prompt == f"is there a {target['shape']} in the image?"
    for record, (prompt, target) in zip(records, prompts):
        if target is None:
            assert prompt == record["prompt"]
    assert all(t is None for _, t in (pairs.focus_prompt(r, i, question_fraction=0.0, seed=3)
                                      for i, r in enumerate(records)))
    assert pairs.focus_prompt({"prompt": "what?", "image": None}, 0, question_fraction=1.0,
                               seed=0) == ("what?", None)


def test_box_coverage():
    assert pairs.box_coverage((0, 0, 32, 32), (8, 8, 24, 24)) == 1.0
    assert pairs.box_coverage((0, 0, 16, 32), (8, 8, 24, 24)) == 0.5
    assert pairs.box_coverage((40, 40, 64, 64), (8, 8, 24, 24)) == 0.0


def test_truth_counts_score_each_reply_against_the_objects():
    objects = [{"shape": "square", "color": "red", "bbox": [0, 0, 9, 9]},
               {"shape": "circle", "color": "blue", "bbox": [20, 20, 30, 30]}]
    caption = pairs.truth_counts({"chosen": "a red square and two green stars.",
                                  "rejected": "a blue circle."}, objects, None)
    assert caption == {"truth/chosen/mentions": 3, "truth/chosen/hallucinated": 2,
                       "truth/chosen/captions": 1, "truth/chosen/hallucinated_captions": 1,
                       "truth/chosen/truths": 2, "truth/chosen/recalled": 1,
                       "truth/rejected/mentions": 1, "truth/rejected/hallucinated": 0,
                       "truth/rejected/captions": 1, "truth/rejected/hallucinated_captions": 0,
                       "truth/rejected/truths": 2, "truth/rejected/recalled": 1}
    question = pairs.truth_counts({"chosen": "yes", "rejected": "no"}, objects, objects[1])
    assert question == {"truth/chosen/answers": 1, "truth/chosen/correct": 1,
                        "truth/rejected/answers": 1, "truth/rejected/correct": 0}
    assert pairs.truth_counts({"chosen": "a red square."}, [], None) == {}
    manifest = {"num_shards": 2, "shards": {"0": {"stats": dict(caption)},
                                            "1": {"stats": {**question, "questions": 1}}}}
    summary = summarize(manifest)
    assert summary["truth/chosen/chair_i"] == 2 / 3 and summary["truth/rejected/chair_i"] == 0.0
    assert summary["truth/chosen/accuracy"] == 1.0 and summary["truth/rejected/accuracy"] == 0.0


def test_noise_depends_on_the_record_key_only():
    pixels = [fx.IMAGE_CONFIG(r["image"]) for r in fx.records(4)]
    noise = [example_randomness.noise_image(p, seed=0, record_index=i, step=600, image_config=fx.IMAGE_CONFIG)
             for i, p in enumerate(pixels)]
    np.testing.assert_array_equal(noise[2], example_randomness.noise_image(
        pixels[2], seed=0, record_index=2, step=600, image_config=fx.IMAGE_CONFIG))
    assert not np.array_equal(noise[2], example_randomness.noise_image(
        pixels[2], seed=1, record_index=2, step=600, image_config=fx.IMAGE_CONFIG))
    # METHODS.md: coefficients 0.7342 / 0.6789 at t=600, eps scaled to CLIP's pixel strength
    mean, std = np.asarray(fx.IMAGE_CONFIG.mean), np.asarray(fx.IMAGE_CONFIG.std)
    clip_mean, clip_std = (np.asarray(c) for c in (image_processing.CLIP_MEAN, image_processing.CLIP_STD))
    pixel = lambda x: x * std + mean
    residual = [(pixel(n) - 0.7342 * pixel(p) - 0.2658 * clip_mean) / (0.6789 * clip_std)
                for n, p in zip(noise, pixels)]
    assert abs(np.std(residual) - 1.0) < 0.05


def test_settings_validation_names_the_bad_values():
    with pytest.raises(ValueError, match="multiple of batch_size"):
        driver.PairSettings(batch_size=8, shard_size=12)
    with pytest.raises(ValueError, match="filter_pairs"):
        driver.PairSettings(filter_pairs=("focus", "calib"))
    with pytest.raises(ValueError, match="unknown P2-DPO pair settings"):
        driver.PairSettings.from_config({"batch": 3})
    config = base.pairs(base_box=32.0)  # the config section a P2-DPO config carries
    assert driver.PairSettings.from_config(config) == driver.PairSettings(base_box=32.0)


def test_v2_focus_prompts_are_the_records_questions_about_present_objects():
    spec = shapes_world_v2.WorldSpecV2(preference_size=24)
    records = list(shapes_world_v2_splits.generate_split(spec, "preference"))
    prompts = [pairs.focus_prompt(r, i, question_fraction=0.5, seed=1) for i, r in enumerate(records)]
    questions = [(r, p, t) for r, (p, t) in zip(records, prompts) if t is not None]
    assert 0 < len(questions) < len(records)
    kinds = set()
    for record, prompt, target in questions:
        asked = json.loads(record["metadata"])["questions"]
        assert prompt in [q["question"] for q in asked if q["boxes"]]  # never a "no" question
        assert target["answer"] != shapes_world.NO and target["bbox"] == target["box"]
        for box in target["boxes"]:  # the union box holds every asked object
            assert pairs.box_coverage(target["bbox"], box) == 1.0
        kinds.add(target["kind"])
        # the exact answer is what the truth counts read
        assert pairs.truth_counts({"chosen": target["answer"] + ".", "rejected": "seven"},
                                  pairs.record_objects(record), target) == {
            "truth/chosen/answers": 1, "truth/chosen/correct": 1,
            "truth/rejected/answers": 1, "truth/rejected/correct": 0}
    assert kinds == {"presence", "colour", "count"}
    for record, (prompt, target) in zip(records, prompts):
        if target is None:
            assert prompt == record["prompt"]


def test_the_report_measures_the_v2_config_and_checks_each_issue_target():
    from scripts import p2dpo_crop_coverage, p2dpo_pairs_report as report

    settings, layout = report.settings_and_layout({"noise_step": 300}, 64)
    assert settings.source_builder == {"world": "v2"} and settings.base_box_fraction == 0.5
    assert settings.combine_mode == "two_images"  # the v2 config's I_aug
    assert (settings.noise_step, settings.num_records, layout.buckets) == (300, 64, (96, 112, 192))
    summary = {"candidates": 10, "questions": 4, "questions_box_covers_object": 3,
               "crop_coverage_rate": 0.75, "questions_encoded": 4, "robust/identical_texts": 1,
               "truth/chosen/chair_i": 0.2, "truth/rejected/chair_i": 0.3,
               "truth/chosen/accuracy": 0.5, "truth/rejected/accuracy": 0.5,
               "truth/robust_chosen/chair_i": 0.1, "truth/robust_rejected/chair_i": 0.4}
    assert report.figures(summary)["issue_14_targets"] == {
        "crop_coverage>=0.8": False, "robust_identical<0.2": True,
        "focus_chosen_chair_i_lower": True, "focus_chosen_accuracy_higher": False,
        "robust_chosen_chair_i_lower": True, "robust_chosen_accuracy_higher": None,
        "focus_chosen_hallucinated_per_caption_lower": None,
        "robust_chosen_hallucinated_per_caption_lower": None}
    # CHAIR_i counts repeated true mentions; hallucinations per caption do not reward them
    counts = {"truth/chosen/captions": 2, "truth/chosen/hallucinated": 2, "truth/chosen/mentions": 8,
              "truth/rejected/captions": 2, "truth/rejected/hallucinated": 1,
              "truth/rejected/mentions": 3, "truth/chosen/chair_i": 0.25,
              "truth/rejected/chair_i": 1 / 3}
    figures = report.figures({**summary, **counts})
    assert figures["kept/chosen/hallucinated_per_caption"] == 1.0
    assert figures["kept/chosen/mentions_per_caption"] == 4.0
    assert figures["issue_14_targets"]["focus_chosen_chair_i_lower"] is True
    assert figures["issue_14_targets"]["focus_chosen_hallucinated_per_caption_lower"] is False
    # the oracle saliency of the coverage script: each 16-px patch's share of the asked boxes
    share = p2dpo_crop_coverage.object_share([[16, 0, 32, 16], [0, 120, 8, 128]], 8, 128)
    assert share[0, 1] == 1.0 and share[7, 0] == 0.25 and share.sum() == 1.25
