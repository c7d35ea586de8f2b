"""P2-DPO pairs on the shapes world v2: does the crop find the asked object, is the chosen side
the more faithful one?

    python scripts/p2dpo_pairs_report.py --data-dir DIR --base MODEL_DIR [--num-records 128] \
        [--seed 0] [--set base_box_fraction=0.25 --set 'saliency="grad_attention"']
    python scripts/p2dpo_pairs_report.py --data-dir DIR --sft-steps 300   # a quick tiny_v2 base

Generates (``pipelines.p2dpo.generate_pairs``) P2-DPO pairs from the first ``--num-records``
records of the v2 world's ``preference`` split under ``--data-dir`` (generated there when absent)
with the SFT base in ``--base`` (a directory of ``engine.model_io.save_model``, e.g.
``scripts/shapes_world_sft.py``'s ``<data-dir>/sft_runs/<name>/model``) or, without one, a
``tiny_v2`` base trained here for ``--sft-steps`` steps of ``configs/sft.py``'s SFT-base recipe.
Pair settings and data layout: those of ``configs/shapes_world_v2.py:p2dpo`` (its ``pairs`` and
``data`` sections), changed by ``--set key=JSON``. Prints one JSON object (settings, seeds,
timings with ``uptime``'s load) with the figures of issue 14:

- ``crop_coverage_rate``: share of the question prompts whose crop box holds >= half of the
  asked object(s)' box (v2's exact boxes; ``pipelines.p2dpo_pairs.box_coverage``), over every
  candidate, and per question kind;
- over the kept pairs: CHAIR_i (object level, captions) and question accuracy (v2's exact
  answers) of each side of the focus pair and of the robustness pair; beside them CHAIR_s,
  hallucinated and all mentions per caption and recall (CHAIR_i counts every repeat of a true
  object, so a side that names objects twice, as on a stitched canvas, can lower it while
  naming more hallucinations per caption);
- ``robust_identical_rate``: robustness pairs whose two replies are the same text (over every
  encoded candidate; also over question and caption prompts apart), and the focus pair's;
- ``issue_14_targets``: each of issue 14's P2-DPO checks, met (true) or missed (false).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import tempfile
import time
from typing import Any

from flax import nnx

from mmpo_jax.config.loading import load_config
from mmpo_jax.data import image_processing
from mmpo_jax.data.builders.p2dpo_pairs import summarize
from mmpo_jax.data.sources import load_split
from mmpo_jax.data.tokenizer import load_tokenizer
from mmpo_jax.engine import model_io
from mmpo_jax.models import presets
from mmpo_jax.models.llava import Llava
from mmpo_jax.pipelines.p2dpo import PairSettings, TrainingLayout, generate_pairs
from mmpo_jax.training import experiment
from mmpo_jax.training.loop import train

WORLD = {"world": "v2"}
CONFIG = "configs/shapes_world_v2.py:p2dpo"
"""The v2 P2-DPO run whose ``pairs`` settings and data layout the report measures."""


def settings_and_layout(overrides: dict[str, Any], num_records: int
                        ) -> tuple[PairSettings, TrainingLayout]:
    """``CONFIG``'s pair settings (``overrides`` and ``num_records`` applied) and its layout."""
    config = load_config(CONFIG, [])
    settings = PairSettings.from_config({**config.pairs.to_dict(), "num_records": num_records,
                                         **overrides})
    return settings, TrainingLayout(tuple(config.data.buckets), int(config.data.max_length),
                                    config.data.template)


def _overrides(items: list[str]) -> dict[str, Any]:
    """``["key=JSON", ...]`` -> {key: value} (strings quoted: ``saliency='"attention"'``)."""
    pairs = [item.partition("=") for item in items]
    return {key: json.loads(value) for key, _, value in pairs}


def quick_base(data_dir: pathlib.Path, tokenizer: Any, image_config: Any, steps: int,
               seed: int) -> Llava:
    """A ``tiny_v2`` SFT base: ``configs/sft.py``'s SFT-base recipe for ``steps`` steps."""
    config = load_config("configs/sft.py", [
        f"data.data_dir={data_dir}", f"data.builder={WORLD!r}", f"sft_base.num_steps={steps}",
        "data.buckets=(128, 160)", "train.progress_bar=false", f"seed={seed}"])
    base_config = experiment.sft_base_config(config)
    source = load_split("shapes_world", "sft", data_dir=data_dir, **WORLD)
    llava_config = presets.tiny_v2(vocab_size=len(tokenizer),
                                   image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                   pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id)
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="p2dpo_report_sft_"))
    return train(base_config, model=Llava(llava_config, rngs=nnx.Rngs(seed)), tokenizer=tokenizer,
                 source=source, image_config=image_config, workdir=workdir).model


def figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The issue's figures from ``data.builders.p2dpo_pairs.summarize``'s totals."""
    out: dict[str, Any] = {key: summary.get(key, 0) for key in ("candidates", "kept", "questions")}
    out["crop_coverage_rate"] = summary.get("crop_coverage_rate")
    for key in sorted(summary):
        if key.startswith("questions/") and summary[key]:
            kind = key.split("/", 1)[1]
            out[f"crop_coverage_rate/{kind}"] = (
                summary.get(f"questions_box_covers_object/{kind}", 0) / summary[key])
    encoded = summary.get("candidates", 0) - sum(
        v for k, v in summary.items() if k.startswith("dropped/"))
    encoded_questions = summary.get("questions_encoded", 0)
    for pair in ("focus", "robust"):
        same, same_questions = (summary.get(f"{pair}/identical_texts{kind}", 0)
                                for kind in ("", "/questions"))
        out[f"{pair}_identical_rate"] = same / max(encoded, 1)
        out[f"{pair}_identical_rate/questions"] = same_questions / max(encoded_questions, 1)
        out[f"{pair}_identical_rate/captions"] = (same - same_questions) / max(
            encoded - encoded_questions, 1)
    for reply in ("chosen", "rejected", "robust_chosen", "robust_rejected"):
        for rate in ("chair_i", "accuracy"):
            out[f"kept/{reply}/{rate}"] = summary.get(f"truth/{reply}/{rate}")
        out[f"kept/{reply}/answers"] = summary.get(f"truth/{reply}/answers", 0)
        out[f"kept/{reply}/mentions"] = summary.get(f"truth/{reply}/mentions", 0)
        counts = {name: summary.get(f"truth/{reply}/{name}", 0) for name in (
            "captions", "hallucinated_captions", "hallucinated", "mentions", "recalled", "truths")}
        if counts["captions"]:  # CHAIR_i counts repeats: read it beside these
            per_caption = {name: counts[name] / counts["captions"]
                           for name in ("hallucinated_captions", "hallucinated", "mentions")}
            out[f"kept/{reply}/chair_s"] = per_caption["hallucinated_captions"]
            out[f"kept/{reply}/hallucinated_per_caption"] = per_caption["hallucinated"]
            out[f"kept/{reply}/mentions_per_caption"] = per_caption["mentions"]
            out[f"kept/{reply}/recall"] = counts["recalled"] / max(counts["truths"], 1)
    out["drops"] = {k: v for k, v in summary.items()
                    if k.startswith(("focus/", "robust/", "dropped/")) and "identical" not in k}
    out["issue_14_targets"] = targets(out)
    return out


def _better(figures_: dict[str, Any], chosen: str, rejected: str, rate: str, lower: bool) -> Any:
    a, b = figures_.get(f"kept/{chosen}/{rate}"), figures_.get(f"kept/{rejected}/{rate}")
    if a is None or b is None:
        return None  # no caption (or no question) among the kept pairs
    return bool(a < b) if lower else bool(a > b)


def targets(figures_: dict[str, Any]) -> dict[str, Any]:
    """Issue 14's P2-DPO checks on ``figures``' numbers: True met, False missed, None unmeasured."""
    coverage = figures_.get("crop_coverage_rate")
    out = {"crop_coverage>=0.8": None if coverage is None else bool(coverage >= 0.8),
           "robust_identical<0.2": bool(figures_["robust_identical_rate"] < 0.2)}
    for pair, (chosen, rejected) in {"focus": ("chosen", "rejected"),
                                     "robust": ("robust_chosen", "robust_rejected")}.items():
        out[f"{pair}_chosen_chair_i_lower"] = _better(figures_, chosen, rejected, "chair_i", True)
        out[f"{pair}_chosen_accuracy_higher"] = _better(figures_, chosen, rejected, "accuracy", False)
        out[f"{pair}_chosen_hallucinated_per_caption_lower"] = _better(  # not an issue target
            figures_, chosen, rejected, "hallucinated_per_caption", True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="~/mmpo_data")
    parser.add_argument("--base", default="", help="SFT base model directory (model_io.save_model)")
    parser.add_argument("--sft-steps", type=int, default=300,
                        help="steps of the quick tiny_v2 base when --base is not given")
    parser.add_argument("--num-records", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="", help="generation folder (default: a new temp one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="a PairSettings field, e.g. base_box=48; repeatable")
    args = parser.parse_args()
    data_dir = pathlib.Path(os.path.expanduser(args.data_dir))
    settings, layout = settings_and_layout(_overrides(args.set), args.num_records)
    report: dict[str, Any] = {"seed": args.seed, "base": args.base or f"quick:{args.sft_steps}",
                              "settings_overrides": args.set, "num_records": args.num_records,
                              "load_before": os.getloadavg()}
    prompts = load_split("shapes_world", "preference", data_dir=data_dir, **WORLD)
    tokenizer = load_tokenizer(prompts.tokenizer_path)
    image_config = image_processing.for_shapes_world(prompts.metadata["world"])
    start = time.perf_counter()
    if args.base:
        model = model_io.load_model(os.path.expanduser(args.base))[0]
    else:
        model = quick_base(data_dir, tokenizer, image_config, args.sft_steps, args.seed)
    report["base_seconds"] = time.perf_counter() - start
    output = args.output or tempfile.mkdtemp(prefix="p2dpo_report_pairs_")
    start = time.perf_counter()
    manifest = generate_pairs(model, tokenizer, prompts, image_config=image_config,
                              output_dir=output, settings=settings, layout=layout, seed=args.seed,
                              source_metadata={"world": prompts.metadata["world"]}, progress=False)
    report["generation_seconds"] = time.perf_counter() - start
    report["load_after"] = os.getloadavg()
    report["output"] = output
    report["figures"] = figures(summarize(manifest))
    print(json.dumps(report, indent=1, sort_keys=True, default=str))


if __name__ == "__main__":
    main()
