"""The SFT base on a shapes world: generation and training time, and how well the base sees.

    python scripts/shapes_world_sft.py [--world world=v2] [--preset tiny_v2] \
        [--set sft_base.num_steps=1500 --set sft_base.learning_rate=1e-3] [--data-dir DIR]

Generates the world under ``--data-dir`` (timed; 0 when already there), trains the SFT base with
the project's training code exactly as ``training.experiment.initial_model`` does
(``experiment.sft_base_config`` of ``configs/sft.py`` with the ``--set`` overrides, then
``training.loop.train``), saves it under ``<data-dir>/sft_runs/<name>/model`` (``--name``) and
evaluates it with ``training.experiment.evaluate`` on the ``eval`` splits (greedy CHAIR, sampled
CHAIR, POPE), plus:

- ``exact_caption_rate``: greedy captions equal to the faithful caption;
- ``recall_easy`` / ``recall_hard``: share of the (colour, shape) objects named, for objects that
  are not small, faint or occluded, and for those that are (v2's ``hard`` flag);
- ``question_accuracy/<kind>``: greedy answers to the caption split's per-image questions (v2);
- ``nll/<word class>`` and ``nll_shuffled/<word class>``: the mean NLL of the faithful captions'
  colour, shape, count (and article) and other words with each record's own image and with
  another record's (``image_dependence``); a class whose two figures are equal is not read from
  the image (what showed that ``tiny_v2`` learns colours but never shapes);
- ``probe_asked_shape/layer<l>``, ``probe_answer/layer<l>``: linear probes at the position that
  predicts a presence question's answer (``answer_position_probe``); ``--prompt-first`` writes the
  prompt before the image, in training and evaluation (an experiment, not a project template).

``configs/shapes_world_v2.py`` trains the vision tower alone first (``sft_base.vision_steps``,
``sft_base.freeze_vision``: `training.vision_pretrain`), as the main job does; ``--set
sft_base.vision_steps=0`` measures the SFT alone.

Prints one JSON object with the timings (and ``uptime``'s load) and the metrics. The image
preprocessing comes from the world's metadata (``image_processing.for_shapes_world``): CLIP's
constants on v2. ``--width`` sets both towers' widths (hidden; MLP 4x in vision, 2x in text), ``--vision`` replaces
fields of the vision config (another stem: ``--vision conv_channels=[16,32,64,128]
--vision token_merge=2``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging as absl_logging
from flax import nnx

from mmpo_jax.data import image_processing, shapes_world, template
from mmpo_jax.data.sources import load_split
from mmpo_jax.data.tokenizer import load_tokenizer
from mmpo_jax.evaluation.runner import generate_texts
from mmpo_jax.models import presets
from mmpo_jax.models.llava import Llava, LlavaConfig
from mmpo_jax.engine import model_io
from mmpo_jax.training import experiment
from mmpo_jax.config.loading import load_config


def _options(items: list[str]) -> dict[str, Any]:
    """``["key=value", ...]`` -> {key: JSON value, or the string when it is not JSON}."""
    options = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def model_config(preset: str, tokenizer: Any, width: int | None, vision: dict[str, Any], runtime: Any,
                 text: dict[str, Any] | None = None) -> LlavaConfig:
    """The preset's config with the tokenizer's ids, optionally both towers at ``width`` and the
    vision (text) config's fields ``vision`` (``text``) replaced (e.g. another conv stem, more
    decoder layers)."""
    config = getattr(presets, preset)(vocab_size=len(tokenizer),
                                      image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                      pad_token_id=tokenizer.pad_token_id,
                                      eos_token_id=tokenizer.eos_token_id)
    fields = config.to_dict()
    if width is not None:
        for tower, mlp in (("vision_config", 4), ("text_config", 2)):
            fields[tower].update(hidden_size=width, intermediate_size=mlp * width)
    fields["vision_config"].update(vision)
    fields["text_config"].update(text or {})
    if "conv_channels" in vision:  # the stem's stride is the patch size
        fields["vision_config"]["patch_size"] = 2 ** (len(vision["conv_channels"]) - 1)
    return experiment.with_runtime(LlavaConfig.from_dict(fields), runtime)


def seeing_metrics(model: Llava, tokenizer: Any, records: list[dict], image_config: Any,
                   batch_size: int, max_new_tokens: int) -> dict[str, float]:
    """Exact captions, recall of easy and hard objects, and per-kind question accuracy (greedy)."""
    common = dict(image_config=image_config, num_image_tokens=model.config.num_image_tokens,
                  batch_size=batch_size, max_new_tokens=max_new_tokens)
    images = [r["image"] for r in records]
    captions = generate_texts(model, tokenizer, images, [r["prompt"] for r in records], **common)
    metadata = [json.loads(r["metadata"]) for r in records]
    named = {"easy": [], "hard": []}
    for caption, record in zip(captions, records):
        said = set(shapes_world.parse_caption(caption))
        for obj in json.loads(record["objects"]):
            named["hard" if obj.get("hard") else "easy"].append((obj["color"], obj["shape"]) in said)
    out = {"exact_caption_rate": float(np.mean([c == m["caption"] for c, m in zip(captions, metadata)])),
           **{f"recall_{k}": float(np.mean(v)) if v else float("nan") for k, v in named.items()},
           "num_hard_objects": len(named["hard"])}
    questions = [(i, q) for i, m in enumerate(metadata) for q in m.get("questions", [])]
    if questions:
        answers = generate_texts(model, tokenizer, [images[i] for i, _ in questions],
                                 [q["question"] for _, q in questions], **common)
        for kind in sorted({q["kind"] for _, q in questions}):
            right = [a.strip(" .") == q["answer"] for a, (_, q) in zip(answers, questions) if q["kind"] == kind]
            out[f"question_accuracy/{kind}"] = float(np.mean(right))
    return out


def _word_classes(tokenizer: Any) -> dict[int, str]:
    """Token id -> "colour" / "shape" / "count" (count words and articles) for the world's words."""
    classes = {}
    for name, words in (("colour", shapes_world.COLOR_CATALOGUE),
                        ("shape", [*shapes_world.SHAPE_CATALOGUE, *shapes_world.CATALOGUE_PLURALS.values()]),
                        ("count", [*shapes_world.ALL_COUNT_WORDS.values(), "a", "an"])):
        classes.update({tokenizer.convert_tokens_to_ids(w): name for w in words})
    return classes


def _teacher_forced(model: Llava, tokenizer: Any, prompts: list[str], responses: list[str],
                    pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One forward of ``prompts`` / ``responses`` on ``pixels`` ``[B, H, W, 3]``: ``(labels [B, T-1],
    log-probs [B, T-1, V] predicting them, supervised [B, T-1])``."""
    encoded = [template.encode_prompt_response(tokenizer, p, r, num_image_tokens=model.config.num_image_tokens,
                                               max_length=1024) for p, r in zip(prompts, responses)]
    length = max(len(e.input_ids) for e in encoded)
    ids = np.full((len(prompts), length), tokenizer.pad_token_id, np.int32)
    valid, supervised = np.zeros_like(ids), np.zeros_like(ids)
    for row, e in enumerate(encoded):
        ids[row, :len(e.input_ids)], valid[row, :len(e.input_ids)] = e.input_ids, 1
        supervised[row, :len(e.input_ids)] = e.loss_mask
    logits = model(jnp.asarray(ids), pixel_values=jnp.asarray(pixels), attention_mask=jnp.asarray(valid)).logits
    logps = np.asarray(jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32)))
    return ids[:, 1:], logps, supervised[:, 1:] == 1


def image_dependence(model: Llava, tokenizer: Any, records: list[dict], image_config: Any
                     ) -> dict[str, float]:
    """Mean NLL per word class of the records' faithful captions, with their own images and with
    the images rolled by one record (``nll/<class>``, ``nll_shuffled/<class>``)."""
    prompts = [r["prompt"] for r in records]
    captions = [json.loads(r["metadata"])["caption"] for r in records]
    pixels = np.stack([image_config(r["image"]) for r in records])
    classes = _word_classes(tokenizer)
    out = {}
    for name, images in (("nll", pixels), ("nll_shuffled", np.roll(pixels, 1, axis=0))):
        labels, logps, supervised = _teacher_forced(model, tokenizer, prompts, captions, images)
        kind = np.vectorize(lambda t: classes.get(int(t), "other"))(labels)
        nll = -np.take_along_axis(logps, labels[..., None], -1)[..., 0]
        for word_class in ("colour", "shape", "count", "other"):
            out[f"{name}/{word_class}"] = float(nll[supervised & (kind == word_class)].mean())
    return out


def answer_dependence(model: Llava, tokenizer: Any, questions: list[tuple[np.ndarray, dict]],
                      image_config: Any, answers: dict[str, list[str]]) -> dict[str, float]:
    """Per question kind, teacher-forced: the NLL of the exact answer's first token with the own
    image and with the next image's (``answer_nll[_shuffled]/<kind>``), the
    accuracy of the likeliest of the kind's ``answers`` (``answer_choice_accuracy/<kind>``; with
    shuffled images: ``..._shuffled``) and the share of the probability mass the model puts on
    them (``answer_mass/<kind>``). An answer read from the image has a lower NLL with its own
    image; equal NLLs mean the reply is a prior over answers."""
    pixels = np.stack([image_config(image) for image, _ in questions])
    # another image for each question: the next image's (several questions may share one image)
    keys = [hash(image.tobytes()) for image, _ in questions]
    order = list(dict.fromkeys(keys))
    first = {key: keys.index(key) for key in order}
    other = [first[order[(order.index(key) + 1) % len(order)]] for key in keys]
    prompts = [q["question"] for _, q in questions]
    truth = [q["answer"] for _, q in questions]
    kinds = np.asarray([q["kind"] for _, q in questions])
    out = {}
    for suffix, images in (("", pixels), ("_shuffled", pixels[other])):
        labels, logps, supervised = _teacher_forced(model, tokenizer, prompts, truth, images)
        first = supervised.argmax(axis=1)  # the answer's first token
        rows = np.arange(len(prompts))
        answer_logps = logps[rows, first]  # [Q, V]
        nll = -answer_logps[rows, labels[rows, first]]
        for kind in sorted(set(kinds)):
            chosen = kinds == kind
            candidates = [tokenizer.convert_tokens_to_ids(a) for a in answers[kind]]
            picked = np.asarray(candidates)[answer_logps[:, candidates].argmax(axis=1)]
            out[f"answer_nll{suffix}/{kind}"] = float(nll[chosen].mean())
            out[f"answer_choice_accuracy{suffix}/{kind}"] = float(
                (picked == labels[rows, first])[chosen].mean())
            if not suffix:
                out[f"answer_mass/{kind}"] = float(np.exp(answer_logps[:, candidates]).sum(1)[chosen].mean())
    return out


def _ridge_probe_accuracy(features: np.ndarray, labels: np.ndarray, ridge: float = 10.0) -> float:
    """Held-out accuracy of a ridge-regression one-vs-rest probe: features ``[N, D]`` standardised,
    fitted on the first two thirds, scored on the last third; ``labels`` ``[N]`` ints."""
    train = np.arange(len(labels)) < len(labels) * 2 // 3
    x = (features - features[train].mean(0)) / (features[train].std(0) + 1e-6)
    x = np.c_[x, np.ones(len(x))]
    targets = np.eye(labels.max() + 1)[labels]
    weights = np.linalg.solve(x[train].T @ x[train] + ridge * np.eye(x.shape[1]), x[train].T @ targets[train])
    return float(((x[~train] @ weights).argmax(1) == labels[~train]).mean())


def answer_position_probe(model: Llava, tokenizer: Any, records: list[dict], image_config: Any,
                          batch_size: int = 50) -> dict[str, float]:
    """Where a presence question's shape and answer are, at the position that predicts the answer
    (the template's last prompt token): ridge-probe accuracy per LM layer of the asked shape
    (``probe_asked_shape/layer<l>``, chance 1/number of shapes) and of yes / no
    (``probe_answer/layer<l>``, chance ~.5) on ``records``' presence questions. A model that answers
    from the image needs the asked shape there before its last layer."""
    questions = [r for r in records if json.loads(r["metadata"]).get("kind") == "presence"]
    features: dict[int, list[np.ndarray]] = {}
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        encoded = [template.encode_prompt(tokenizer, r["prompt"], num_image_tokens=model.config.num_image_tokens)
                   for r in chunk]
        ids = np.full((len(chunk), max(len(e.input_ids) for e in encoded)), tokenizer.pad_token_id, np.int32)
        valid = np.zeros_like(ids)
        for row, e in enumerate(encoded):
            ids[row, :len(e.input_ids)], valid[row, :len(e.input_ids)] = e.input_ids, 1
        last = valid.sum(1) - 1
        pixels = np.stack([image_config(r["image"]) for r in chunk])
        states = model(jnp.asarray(ids), pixel_values=jnp.asarray(pixels), attention_mask=jnp.asarray(valid),
                       output_hidden_states=True).hidden_states
        for layer, hidden in enumerate(states):
            features.setdefault(layer, []).append(np.asarray(hidden)[np.arange(len(chunk)), last])
    asked = [json.loads(r["metadata"])["shape"] for r in questions]
    shape_labels = np.asarray([sorted(set(asked)).index(a) for a in asked])
    answer_labels = np.asarray([r["response"] == shapes_world.YES for r in questions], np.int64)
    out = {"probe_questions": len(questions)}
    for layer, parts in features.items():
        stacked = np.concatenate(parts)
        out[f"probe_asked_shape/layer{layer}"] = _ridge_probe_accuracy(stacked, shape_labels)
        out[f"probe_answer/layer{layer}"] = _ridge_probe_accuracy(stacked, answer_labels)
    return out


def use_prompt_first_template() -> None:
    """[experiment] This process's ``llava_1_5`` template writes the prompt before the image(s)
    (``USER: {prompt}\\n<image>\\n ASSISTANT:``), in training and evaluation alike, so that image
    tokens can attend to the asked shape (causal attention)."""
    layout = template.TEMPLATES["llava_1_5"]

    class PromptFirst(template.ConversationTemplate):
        def prompt_text(self, prompt: str, *, num_images: int, system_prompt: str | None, image_token: str) -> str:
            system = "" if system_prompt is None else system_prompt + self.system_separator
            images = (image_token + self.image_separator) * num_images
            return f"{system}{self.user_prefix}{prompt}\n{images}{self.assistant_prefix}"

    template.TEMPLATES["llava_1_5"] = PromptFirst(**dataclasses.asdict(layout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/shapes_world_v2.py:sft")
    parser.add_argument("--world", action="append", default=[], metavar="OPTION=VALUE",
                        help="shapes-world builder option (JSON value), e.g. world=v2; repeatable")
    parser.add_argument("--preset", default="tiny_v2")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--vision", action="append", default=[], metavar="FIELD=VALUE",
                        help="vision config field (JSON value), e.g. conv_channels=[16,32,64,128]; repeatable")
    parser.add_argument("--text", action="append", default=[], metavar="FIELD=VALUE",
                        help="text config field (JSON value), e.g. num_hidden_layers=3; repeatable")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--data-dir", default="~/mmpo_data")
    parser.add_argument("--name", default="sft_base")
    parser.add_argument("--vision-from", default="",
                        help="a saved model whose vision tower replaces the fresh one (e.g. an earlier "
                             "run's <data-dir>/sft_runs/<name>/model); with --set sft_base.vision_steps=0 "
                             "the tower's pretraining is skipped")
    parser.add_argument("--prompt-first", action="store_true",
                        help="[experiment] the prompt before the image in training and evaluation")
    args = parser.parse_args()
    if args.prompt_first:
        use_prompt_first_template()
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("mmpo_jax").setLevel(logging.INFO)
    options = _options(args.world or ["world=v2"])
    data_dir = pathlib.Path(os.path.expanduser(args.data_dir))
    config = load_config(args.config, [f"data.data_dir={data_dir}", f"data.builder={options!r}", *args.set])
    report: dict[str, Any] = {"world": options, "preset": args.preset, "width": args.width, "vision": args.vision,
                              "text": args.text, "overrides": args.set, "load_before": os.getloadavg()}

    start = time.perf_counter()
    source = load_split(config.data.dataset, config.sft_base.split, data_dir=data_dir, **options)
    report["world_seconds"] = time.perf_counter() - start
    tokenizer = load_tokenizer(source.tokenizer_path)
    image_config = image_processing.for_shapes_world(source.metadata["world"])
    llava_config = model_config(args.preset, tokenizer, args.width, _options(args.vision), config.model,
                                _options(args.text))
    report["parameters"] = presets.count_parameters(llava_config)

    base_config = experiment.sft_base_config(config)
    report["sft"] = base_config.sft_base.to_dict()
    workdir = data_dir / "sft_runs" / args.name
    start = time.perf_counter()
    model = Llava(llava_config, rngs=nnx.Rngs(int(config.seed)))
    if args.vision_from:
        nnx.update(model.vision_tower, nnx.state(model_io.load_model(args.vision_from)[0].vision_tower))
    held_out = load_split(config.data.dataset, "validation_caption", data_dir=data_dir, **options)
    model = experiment.train_sft_base(base_config, model, tokenizer, source, image_config, workdir / "run",
                                      held_out=[held_out[i] for i in range(min(len(held_out), 128))])
    report["sft_seconds"] = time.perf_counter() - start  # the vision tower's steps included
    report["load_after_sft"] = os.getloadavg()
    model_io.save_model(model, workdir / "model")

    start = time.perf_counter()
    metrics = experiment.evaluate(config, model, tokenizer, image_config)
    captions = load_split(config.data.dataset, config.eval.caption_split, data_dir=data_dir, **options)
    records = [captions[i] for i in range(len(captions))][: int(config.eval.num_captions) or None]
    metrics.update(seeing_metrics(model, tokenizer, records, image_config,
                                  int(config.eval.batch_size), int(config.eval.max_new_tokens)))
    metrics.update(image_dependence(model, tokenizer, records[:128], image_config))
    world = source.metadata["world"]
    answers = {"presence": [shapes_world.YES, shapes_world.NO], "colour": list(world["colors"]),
               "count": list(shapes_world.NUMBER_WORDS.values())}
    questions = [(r["image"], q) for r in records[:200] for q in json.loads(r["metadata"]).get("questions", [])]
    if questions:
        metrics.update(answer_dependence(model, tokenizer, questions, image_config, answers))
    metrics.update(answer_position_probe(model, tokenizer, [source[i] for i in range(min(len(source), 4000))],
                                         image_config))
    report["eval_seconds"] = time.perf_counter() - start
    report["metrics"] = metrics
    report["load_after"] = os.getloadavg()
    print(json.dumps(report, indent=1, sort_keys=True, default=str))
    (workdir / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True, default=str))


if __name__ == "__main__":
    main()
