"""`python -m mmpo_jax.evaluate` on real-format files with a tiny llava-hf model (30-px CLIP tower).

The model is imported with `convert import` (which saves the tokenizer and processor beside it;
the flags still name the llava-hf directory's, with `--image_aspect_ratio pad`); the benchmark files are COCO, POPE and AMBER fixtures in
their published formats. The metrics the command prints must be those of the replies the model
gives to exactly the benchmark's prompts and images, scored against exactly its ground truth.
"""

from __future__ import annotations

import json
import shutil

import pytest

from mmpo_jax import convert, evaluate
from mmpo_jax.data.image_processing import from_pretrained_dir
from mmpo_jax.evaluation import amber, coco, pope, suite
from mmpo_jax.engine.loading import load_model
from mmpo_jax.evaluation.records import load_rgb
from mmpo_jax.evaluation.runner import caption_metrics, generate_texts
from tests.evaluation import real_fixtures
from tests.traces import traced_functions
from tests.models import hf_fixtures

CAPTION_TOKENS, ANSWER_TOKENS = 6, 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    hf_fixtures.save_tiny_llava_hf(root / "hf")
    convert.main(["import", str(root / "hf"), str(root / "orbax")])
    paths = real_fixtures.write_coco(root / "coco")
    paths["pope"] = real_fixtures.write_pope(root / "pope", paths["images"])
    paths.update({f"amber_{k}": v for k, v in real_fixtures.write_amber(root / "amber").items()})
    flags = ["--checkpoint", str(root / "orbax"), "--tokenizer", str(root / "hf"), "--processor", str(root / "hf"),
             "--image_aspect_ratio", "pad",
             "--coco_instances", str(paths["instances"]), "--coco_captions", str(paths["captions"]),
             "--coco_images", str(paths["images"]), "--caption_prompt", "Describe the picture in detail.",
             "--pope_questions", *map(str, paths["pope"]), "--pope_images", str(paths["images"]),
             "--amber_dir", str(paths["amber_data"]), "--amber_images", str(paths["amber_images"]),
             "--question_suffix", " Yes or no?", "--batch_size", "4",
             "--caption_max_new_tokens", str(CAPTION_TOKENS), "--answer_max_new_tokens", str(ANSWER_TOKENS)]
    return root, paths, flags


def _replies(model, tokenizer, image_config, images, prompts, max_new_tokens):
    return generate_texts(model, tokenizer, images, prompts, image_config=image_config,
                          num_image_tokens=model.config.num_image_tokens, batch_size=4, max_new_tokens=max_new_tokens)


@pytest.mark.slow
def test_every_benchmark_is_scored_on_the_model_replies(setup, capsys):
    root, paths, flags = setup
    metrics = evaluate.main([*flags, "--output", str(root / "metrics.json")])
    assert json.loads((root / "metrics.json").read_text()) == metrics
    assert "AMBER CHAIR" in capsys.readouterr().out

    # The same replies and scores, computed here from the published files directly.
    model, tokenizer, image_config = load_model(root / "orbax", tokenizer=root / "hf", processor=root / "hf",
                                                image_aspect_ratio="pad")
    assert image_config.pad_to_square and image_config.crop_size == 30
    ground_truth = coco.read_coco_objects(paths["instances"], paths["captions"])
    captions = coco.coco_caption_records(ground_truth, paths["images"], prompt="Describe the picture in detail.")
    texts = _replies(model, tokenizer, image_config, [captions[i]["image"] for i in range(len(captions))],
                     ["Describe the picture in detail."] * len(captions), CAPTION_TOKENS)
    expected = caption_metrics("coco", texts, captions.fields)
    questions = [q for path in paths["pope"] for q in pope.read_pope_questions(path)]
    categories = [pope.category_from_filename(path) for path in paths["pope"] for _ in pope.read_pope_questions(path)]
    answers = _replies(model, tokenizer, image_config,
                       [load_rgb(paths["images"] / q.image) for q in questions],
                       [q.text + " Yes or no?" for q in questions], ANSWER_TOKENS)
    expected.update(pope.pope_metrics(answers, [q.label for q in questions], categories))
    data = amber.read_amber(paths["amber_data"])
    queries = amber.read_amber_queries(paths["amber_data"] / "query" / "query_all.json")
    described = [q for q in queries if q.id <= 2]
    asked = [q for q in queries if q.id > 2]
    descriptions = _replies(model, tokenizer, image_config,
                            [load_rgb(paths["amber_images"] / q.image) for q in described],
                            [q.query for q in described], CAPTION_TOKENS)
    amber_answers = _replies(model, tokenizer, image_config,
                             [load_rgb(paths["amber_images"] / q.image) for q in asked],
                             [q.query + " Yes or no?" for q in asked], ANSWER_TOKENS)
    expected.update(amber.generative_metrics(descriptions, [q.id for q in described], data))
    expected.update(amber.discriminative_metrics(
        amber_answers, [data.annotations[q.id]["truth"] for q in asked],
        [amber.dimension(data.annotations[q.id]["type"]) for q in asked]))
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value), name
    assert metrics["chair_images"] == 4.0 and metrics["num_samples"] == 1.0
    assert {"pope_random_f1", "pope_adversarial_f1", "amber_existence_f1", "amber_relation_accuracy",
            "amber_cog", "caption_words"} <= set(metrics)


@pytest.mark.slow
def test_an_exported_or_llava_hf_directory_evaluates_without_extra_flags(setup):
    root, paths, _ = setup
    metrics = evaluate.main(["--checkpoint", str(root / "hf"), "--pope_questions", str(paths["pope"][0]),
                             "--pope_images", str(paths["images"]), "--answer_max_new_tokens", "2"])
    assert set(metrics) >= {"pope_random_accuracy", "pope_accuracy"}


@pytest.mark.slow
def test_in_training_evaluation_api_samples_and_limits(setup):
    root, paths, _ = setup
    model, tokenizer, image_config = load_model(root / "hf")
    spec = suite.EvaluationSpec.from_dict(dict(
        coco_instances=str(paths["instances"]), coco_images=str(paths["images"]), num_caption_images=3,
        amber_dir=str(paths["amber_data"]), amber_images=str(paths["amber_images"]),
        amber_queries=["query/query_generative.json"], decoding="sample", num_samples=2, temperature=1.0,
        caption_max_new_tokens=4, max_examples=2, batch_size=2))
    benchmarks = suite.load_benchmarks(spec)
    metrics = suite.evaluate(model, tokenizer, image_config, spec, benchmarks)
    assert metrics["chair_images"] == 2.0 and metrics["num_samples"] == 2.0
    assert {"chair_s_std", "amber_chair", "amber_cover_std"} <= set(metrics)
    assert not any(name.startswith(("pope", "amber_accuracy")) for name in metrics)
    assert metrics == suite.evaluate(model, tokenizer, image_config, spec, benchmarks)  # seeded


@pytest.mark.slow
def test_all_benchmarks_share_one_decode_compilation_per_length_cap(setup):
    """Captions, POPE and AMBER prompts of many lengths: padded to the longest of all, they compile
    the decode loop once per `max_new_tokens` (twice here: captions and answers)."""
    root, paths, _ = setup
    model, tokenizer, image_config = load_model(root / "hf")
    spec = suite.EvaluationSpec.from_dict(dict(
        coco_instances=str(paths["instances"]), coco_images=str(paths["images"]),
        pope_questions=[str(p) for p in paths["pope"]], pope_images=str(paths["images"]),
        amber_dir=str(paths["amber_data"]), amber_images=str(paths["amber_images"]),
        caption_prompt="Describe the picture in detail, please, every object in it.", batch_size=2,
        caption_max_new_tokens=CAPTION_TOKENS + 1, answer_max_new_tokens=ANSWER_TOKENS + 1))
    with traced_functions() as traced:
        suite.evaluate(model, tokenizer, image_config, spec)
    assert traced.count("_generate") == 2, traced


@pytest.mark.parametrize("extra, message", [
    (["--pope_questions", "q.json"], "--pope_questions needs --pope_images"),
    (["--coco_images", "val2014"], "--coco_images needs --coco_instances"),
    (["--amber_dir", "data", "--decoding", "sample"], "--amber_dir needs --amber_images"),
    (["--heldout_dataset", "rlhf_v", "--coco_instances", "i.json"], "--heldout_dataset needs --heldout_split"),
])
def test_incomplete_flags_are_named_before_the_model_loads(tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        evaluate.main(["--checkpoint", str(tmp_path / "absent"), *extra])


def test_every_path_flag_naming_nothing_is_listed_before_the_model_loads(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as error:
        evaluate.main(["--checkpoint", str(tmp_path / "absent"), "--pope_questions",
                       str(tmp_path / "q.json"), str(tmp_path), "--pope_images",
                       str(tmp_path / "a_file")])
    assert str(error.value) == (
        f"python -m mmpo_jax.evaluate: --checkpoint {tmp_path / 'absent'}: no such folder; "
        f"--pope_questions {tmp_path / 'q.json'}: no such file; --pope_questions {tmp_path}: not "
        f"a file; --pope_images {tmp_path / 'a_file'}: not a folder")
    with pytest.raises(SystemExit, match="--checkpoint .*absent: no such folder"):  # shapes world
        evaluate.main(["--checkpoint", str(tmp_path / "absent")])


def test_a_model_directory_without_tokenizer_names_the_flag(setup, tmp_path):
    root, paths, _ = setup
    (tmp_path / "weights").mkdir()  # an orbax folder imported before `import` saved the processor
    shutil.copy(root / "orbax" / "config.json", tmp_path / "weights")
    shutil.copytree(root / "orbax" / "params", tmp_path / "weights" / "params")
    with pytest.raises(FileNotFoundError, match="pass --tokenizer"):
        evaluate.main(["--checkpoint", str(tmp_path / "weights"), "--pope_questions", str(paths["pope"][0]),
                       "--pope_images", str(paths["images"])])


def test_convert_import_makes_the_orbax_directory_self_contained(setup, tmp_path):
    """`convert import --image_aspect_ratio pad` saves the tokenizer and processor beside the
    model: the directory alone loads with the padded preprocessing."""
    root, _, _ = setup
    convert.main(["import", str(root / "hf"), str(tmp_path / "model"), "--image_aspect_ratio", "pad"])
    model, tokenizer, _ = load_model(root / "orbax", tokenizer=root / "hf", processor=root / "hf")
    padded = from_pretrained_dir(root / "hf", image_aspect_ratio="pad")
    _, loaded_tokenizer, image_config = load_model(tmp_path / "model")
    assert image_config == padded and loaded_tokenizer.encode("a cat") == tokenizer.encode("a cat")
    assert from_pretrained_dir(root / "orbax") == from_pretrained_dir(root / "hf")  # default: the file's
