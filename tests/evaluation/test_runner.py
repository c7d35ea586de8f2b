"""The evaluation runner end to end with a tiny random LLaVA, its scorer, and the table."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmpo_jax.engine.model_io import save_model
from mmpo_jax.data import image_processing, shapes_world
from mmpo_jax.data.template import encode_prompt
from mmpo_jax.data.tokenizer import build_word_tokenizer
from mmpo_jax.evaluate import _parser as evaluate_parser
from mmpo_jax.evaluate import main as evaluate_main
from mmpo_jax.evaluation.chair import ChairCounts
from mmpo_jax.evaluation.pope import pope_metrics
from mmpo_jax.evaluation.runner import caption_metrics, evaluate_model, model_scorer, summarise_passes
from mmpo_jax.evaluation.table import format_table
from mmpo_jax.models.clip import CLIPVisionConfig
from mmpo_jax.models.llama import LlamaConfig
from mmpo_jax.models.llava import Llava, LlavaConfig
from tests.traces import traced_functions

WORLD = shapes_world.WorldSpec(test_caption_size=3, test_pope_images=1, seed=3)
BATCH = 4


@pytest.fixture(scope="module")
def setup():
    tokenizer = build_word_tokenizer(shapes_world.vocabulary(), model_max_length=512)
    # smaller than presets.tiny (patch stem, width 32, one layer each) to keep compile times short
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                       image_size=WORLD.image_size, patch_size=16),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = Llava(config, rngs=nnx.Rngs(0))
    captions = list(shapes_world.generate_split(WORLD, "test_caption"))
    pope = list(shapes_world.generate_split(WORLD, "test_pope"))
    return dict(tokenizer=tokenizer, model=model, config=config, captions=captions, pope=pope,
                image_config=image_processing.tiny(WORLD.image_size))


def _evaluate(setup, **options):
    return evaluate_model(setup["model"], setup["tokenizer"], caption_split=setup["captions"],
                          pope_split=setup["pope"], image_config=setup["image_config"],
                          num_image_tokens=setup["config"].num_image_tokens, batch_size=BATCH,
                          max_new_tokens=6, **options)


def _check_well_formed(metrics):
    for name in ("chair_s", "chair_i", "recall", "chair_s_attr", "chair_i_attr", "recall_attr", "partner_rate",
                 "continuation_prob", "pope_accuracy", "pope_f1", "pope_yes_ratio",
                 *(f"pope_{split}_{m}" for split in shapes_world.POPE_CATEGORIES
                   for m in ("accuracy", "precision", "recall", "f1", "yes_ratio"))):
        assert name in metrics, name
        assert isinstance(metrics[name], float) and 0.0 <= metrics[name] <= 1.0, (name, metrics[name])


@pytest.mark.slow
def test_greedy_and_sampled_evaluation_run_and_are_well_formed(setup):
    with traced_functions() as traced:
        greedy = _evaluate(setup, decoding="greedy")
    assert traced.count("_generate") <= 1, traced  # captions and POPE questions share one decode loop
    _check_well_formed(greedy)
    assert greedy["num_samples"] == 1.0 and not any(k.endswith("_std") for k in greedy)
    sampled = _evaluate(setup, decoding="sample", num_samples=2, seed=1)
    _check_well_formed(sampled)
    assert sampled["num_samples"] == 2.0
    assert {k for k in sampled if k.endswith("_std")} == {
        f"{k}_std" for k in greedy if k not in ("continuation_prob", "num_samples")}
    # teacher-forced, so independent of the decoding
    assert sampled["continuation_prob"] == pytest.approx(greedy["continuation_prob"], rel=1e-6)
    assert _evaluate(setup, decoding="sample", num_samples=2, seed=1) == sampled  # seeded
    table = format_table({"greedy": greedy, "sampled": sampled})
    assert "±" in table.splitlines()[3] and "±" not in table.splitlines()[2]


@nnx.jit
def _forward(model, input_ids, pixel_values):
    return model(input_ids, pixel_values=pixel_values).logits


def test_scorer_matches_a_plain_forward_one_row_at_a_time(setup):
    """Batching and right padding do not change the scores; they are the model's next-token log-softmax."""
    tokenizer, model, config = setup["tokenizer"], setup["model"], setup["config"]
    images = [record["image"] for record in setup["captions"]]
    prompt = encode_prompt(tokenizer, shapes_world.CAPTION_PROMPT, num_image_tokens=config.num_image_tokens).input_ids
    continuations = [np.array([5, 6, 7]), np.array([8]), np.array([9, 10, 11, 12, 13, 14, 15, 16, 17])]
    score = model_scorer(model, setup["image_config"], pad_id=tokenizer.pad_token_id, batch_size=BATCH)
    together = score(images, [prompt] * 3, continuations)
    for image, continuation, scored in zip(images, continuations, together):
        ids = np.concatenate([prompt, continuation])[None]
        logits = _forward(model, jnp.asarray(ids), jnp.asarray(setup["image_config"](image))[None])
        log_probs = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1))
        expected = log_probs[np.arange(len(prompt) - 1, ids.shape[1] - 1), continuation]
        np.testing.assert_allclose(scored, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_details_hold_every_pass_item_by_item_and_add_up_to_the_metrics(setup):
    details = []
    metrics = _evaluate(setup, decoding="sample", num_samples=2, seed=1, details=details)
    assert len(details) == 2
    passes = [caption_metrics("shapes_world", one["captions"], setup["captions"]) for one in details]
    for one, scored in zip(details, passes):
        assert len(one["chair"]) == len(setup["captions"]) and len(one["pope"]) == len(setup["pope"])
        assert ChairCounts(*np.sum(one["chair"], axis=0)).metrics() == pytest.approx(
            {k: scored[k] for k in ("chair_s", "chair_i", "recall")})
        tp, fp, tn, fn = np.sum(one["pope"], axis=0)
        pope = pope_metrics(one["answers"], [r["answer"] for r in setup["pope"]],
                            [r["category"] for r in setup["pope"]])
        # the categories have as many questions each, so pooled accuracy is their mean
        assert (tp + tn) / (tp + fp + tn + fn) == pytest.approx(pope["pope_accuracy"])
        assert (tp + fp) / (tp + fp + tn + fn) == pytest.approx(pope["pope_yes_ratio"])
        assert len(set(one["pope_images"])) == WORLD.test_pope_images
    assert metrics["chair_i"] == pytest.approx(np.mean([p["chair_i"] for p in passes]))


@pytest.mark.slow
def test_adapt_decoding_evaluation_is_well_formed(setup):
    metrics = _evaluate(setup, decoding="adapt_steer")
    _check_well_formed(metrics)
    assert metrics["num_samples"] == 1.0 and not any(k.endswith("_std") for k in metrics)


def test_bad_options_are_named(setup):
    with pytest.raises(ValueError, match="num_samples=3"):
        _evaluate(setup, decoding="greedy", num_samples=3)
    with pytest.raises(ValueError, match="num_samples=2: adapt_mask decoding takes exactly 1"):
        _evaluate(setup, decoding="adapt_mask", num_samples=2)
    with pytest.raises(ValueError, match="'beam'"):
        _evaluate(setup, decoding="beam")
    with pytest.raises(ValueError, match="temperature=0"):
        _evaluate(setup, decoding="sample", temperature=0.0)


def test_summarise_passes_mean_and_spread():
    summary = summarise_passes([{"a": 0.2, "b": 1.0}, {"a": 0.4, "b": 1.0}], with_spread=True)
    assert summary == pytest.approx({"a": 0.3, "a_std": 0.1, "b": 1.0, "b_std": 0.0})
    assert summarise_passes([{"a": 0.2}], with_spread=False) == {"a": 0.2}


@pytest.mark.slow
def test_evaluate_cli_on_a_small_shapes_world(setup, tmp_path, capsys):
    save_model(setup["model"], tmp_path / "model")
    world = [f"--world={key}={value}" for key, value in
             dict(sft_size=2, preference_size=2, test_caption_size=3, test_pope_images=1, seed=3).items()]
    output = tmp_path / "metrics.json"
    metrics = evaluate_main(["--checkpoint", str(tmp_path / "model"), "--data_dir", str(tmp_path / "data"), *world,
                             "--batch_size", str(BATCH), "--max_new_tokens", "6", "--name", "tiny",
                             "--output", str(output)])
    _check_well_formed(metrics)
    assert json.loads(output.read_text()) == metrics
    # the same records and model as the runner test: the same numbers
    assert metrics == pytest.approx(_evaluate(setup, decoding="greedy"), rel=1e-6)
    printed = capsys.readouterr().out
    assert printed.splitlines()[-1].startswith("tiny ")


def test_evaluate_cli_offers_the_adapt_decodings(tmp_path):
    for decoding in ("adapt_steer", "adapt_blend", "adapt_mask"):
        assert evaluate_parser().parse_args(["--checkpoint", str(tmp_path), "--decoding", decoding]).decoding == decoding


def test_evaluate_cli_rejects_incomplete_real_data_flags(tmp_path):
    with pytest.raises(SystemExit, match="--pope_questions needs --pope_images"):
        evaluate_main(["--checkpoint", str(tmp_path), "--pope_questions", str(tmp_path / "q.json")])
    with pytest.raises(SystemExit, match="'p0.5'"):
        evaluate_main(["--checkpoint", str(tmp_path), "--world", "p0.5"])


def test_coco_caption_metrics_read_category_lists():
    records = [{"objects": json.dumps(["person", "bicycle"])}, {"objects": json.dumps(["cat"])}]
    metrics = caption_metrics("coco", ["Two men ride bikes past a bus.", ""], records)
    assert metrics == pytest.approx({"chair_s": 1 / 2, "chair_i": 1 / 3, "recall": 2 / 3})
    with pytest.raises(ValueError, match=r"\['kitty'\] are not COCO categories"):
        caption_metrics("coco", ["a cat"], [{"objects": json.dumps(["kitty"])}])
    with pytest.raises(ValueError, match="'amber'"):
        caption_metrics("amber", [], [])
