"""Benchmark: one DPO optimizer step, our jitted train step vs TRL's `DPOTrainer` step.

Both sides train the issue's small but realistic LLaVA (`benchlib.SMALL_LLAVA`, random weights built by
transformers, nothing downloaded) on the same batch of `--pairs` preference pairs (one 336-px image,
576 placeholders and a short prompt per pair, right-padded responses of 60-100 tokens) with the same
settings: sigmoid DPO, beta 0.1, a frozen reference copy (the policy starts perturbed from it, so the loss
is not log 2; the vision tower is the same in both and frozen), projector and decoder trained by AdamW
(lr 1e-5, no weight decay), float32.

* ours: `engine.step.make_train_step` (reference mode ``copy``), the step `training.loop` runs;
* TRL (`trl` from the optional ``bench`` extra): `DPOTrainer.training_step` (its forward on the
  completion positions, `fused_lm_head`, and backward) followed by `optimizer.step()`/`zero_grad()`,
  the body of its training loop, on the same tensors (chosen rows then rejected rows, as its collator
  makes them). Its default gradient checkpointing is on unless ``--no-checkpointing``.

Prints the first step's loss of both sides (same weights, same batch: they must agree), the medians of
`--repeats` interleaved steps, the time ratio ours/TRL (< 1: we are faster) and the machine's load.
A benchmark, not a test. Run:

  pip install '.[bench]'          # trl
  python scripts/bench_dpo_vs_trl.py
  python scripts/bench_dpo_vs_trl.py --pairs 2 --repeats 3 --no-checkpointing
"""

from __future__ import annotations

import argparse
import os
import tempfile

import benchlib
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mmpo_jax.data.batch import Batch
from mmpo_jax.data.image_processing import ImageProcessorConfig
from mmpo_jax.engine import state as state_lib
from mmpo_jax.engine.reference import merged_copy
from mmpo_jax.engine.scoring import plan_scoring
from mmpo_jax.engine.step import make_train_step
from mmpo_jax.models.convert import load_hf_llava

METHOD = {"name": "dpo", "beta": 0.1}
LEARNING_RATE = 1e-5
MODEL_CONFIG = {"lora": {"enabled": False}, "freeze_vision": True, "train_projector": True}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-checkpointing", action="store_true",
                        help="turn TRL's default gradient checkpointing off")
    return parser.parse_args()


def save_policy_and_reference(policy_dir: str, reference_dir: str, seed: int) -> None:
    """The reference: `SMALL_LLAVA` from `seed`; the policy: the same model with its projector and decoder
    perturbed (noise of 0.5 std per tensor), its vision tower the reference's (frozen, as in training, where
    the step shares the frozen tower's features between both models)."""
    import torch

    model = benchlib.save_small_llava(reference_dir, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "vision_tower" not in name and parameter.numel() > 1:
                noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                parameter.add_(0.5 * parameter.std() * noise)
    model.save_pretrained(policy_dir)


def make_batch(pairs: int, seed: int) -> dict[str, np.ndarray]:
    """Right-padded ``chosen``/``rejected`` ids and loss masks ``[B, T]`` (one T for both) and pixels."""
    rng = np.random.default_rng(seed)
    image = benchlib.SMALL_LLAVA["image_token_id"]
    num_image = (benchlib.SMALL_LLAVA["vision"]["image_size"] // benchlib.SMALL_LLAVA["vision"]["patch_size"]) ** 2
    rows = {"chosen": [], "rejected": []}
    for _ in range(pairs):
        prompt = [1, *rng.integers(3, image, 5), *[image] * num_image, *rng.integers(3, image, 12)]
        for group in rows:
            response = list(rng.integers(3, image, int(rng.integers(60, 101)))) + [2]
            rows[group].append((prompt + response, len(prompt)))
    length = max(len(ids) for group in rows.values() for ids, _ in group)
    out = {}
    for group, items in rows.items():
        ids = np.full((pairs, length), benchlib.SMALL_LLAVA["pad_token_id"], np.int32)
        loss = np.zeros((pairs, length), np.int32)
        attention = np.zeros((pairs, length), np.int32)
        for b, (row, prompt_length) in enumerate(items):
            ids[b, :len(row)], attention[b, :len(row)], loss[b, prompt_length:len(row)] = row, 1, 1
        out.update({f"{group}_input_ids": ids, f"{group}_loss_mask": loss,
                    f"{group}_attention_mask": attention})
    size = benchlib.SMALL_LLAVA["vision"]["image_size"]
    out["pixel_values"] = rng.normal(size=(pairs, size, size, 3)).astype(np.float32)
    return out


def ours(policy_dir: str, reference_dir: str, data: dict[str, np.ndarray]):
    """``(step() -> loss, first loss)``: our jitted step on the batch, its state carried between calls."""
    policy, _ = load_hf_llava(policy_dir)
    reference, _ = load_hf_llava(reference_dir)
    split = state_lib.split_policy(policy, MODEL_CONFIG)
    ref_graphdef, ref_state = nnx.split(merged_copy(reference))
    tx = optax.adamw(LEARNING_RATE, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)
    size = data["pixel_values"].shape[1]
    step_fn = make_train_step(graphdef=split.graphdef, plan=plan_scoring(METHOD), method_config=METHOD, tx=tx,
                              reference_mode="copy", reference_graphdef=ref_graphdef,
                              image_config=ImageProcessorConfig(size=size, crop_size=size), eos_token_id=2)
    pairs = data["pixel_values"].shape[0]
    batch = jax.tree.map(jnp.asarray, Batch(**data, example_mask=np.ones(pairs, np.int32),
                                            example_index=np.arange(pairs, dtype=np.int32)))
    state = {"trainable": split.trainable, "opt": tx.init(split.trainable)}

    def step():
        state["trainable"], state["opt"], metrics = step_fn(state["trainable"], state["opt"], split.frozen,
                                                            ref_state, batch, {}, jax.random.key(0))
        total, count = metrics["loss/total"]  # a (sum, count) metric
        return total / count

    return step


def trl_side(policy_dir: str, reference_dir: str, data: dict[str, np.ndarray], checkpointing: bool,
             output_dir: str):
    """``step() -> loss``: TRL's training step and optimizer update on the same batch."""
    import datasets
    import torch
    from transformers import LlavaForConditionalGeneration
    from trl import DPOConfig, DPOTrainer

    from mmpo_jax.data.tokenizer import build_word_tokenizer

    policy = LlavaForConditionalGeneration.from_pretrained(policy_dir, attn_implementation="sdpa")
    reference = LlavaForConditionalGeneration.from_pretrained(reference_dir, attn_implementation="sdpa")
    for parameter in policy.model.vision_tower.parameters():
        parameter.requires_grad_(False)
    tokenizer = build_word_tokenizer(["a", "b"], model_max_length=4096)  # only its dataset prep reads it
    dataset = datasets.Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["a"]})
    args = DPOConfig(output_dir=output_dir, per_device_train_batch_size=data["pixel_values"].shape[0],
                     learning_rate=LEARNING_RATE, weight_decay=0.0, beta=METHOD["beta"], loss_type=["sigmoid"],
                     gradient_checkpointing=checkpointing, report_to="none", use_cpu=True, bf16=False,
                     max_length=None, logging_steps=1_000_000, save_strategy="no", lr_scheduler_type="constant",
                     warmup_steps=0, max_grad_norm=0.0)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=dataset,
                         processing_class=tokenizer)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by its train loop, which we do not run
    both = {s: np.concatenate([data[f"chosen_{s}"], data[f"rejected_{s}"]]) for s in
            ("input_ids", "loss_mask", "attention_mask")}
    pixels = np.concatenate([data["pixel_values"]] * 2).transpose(0, 3, 1, 2)
    inputs = {"input_ids": torch.from_numpy(both["input_ids"].astype(np.int64)),
              "attention_mask": torch.from_numpy(both["attention_mask"].astype(np.int64)),
              "completion_mask": torch.from_numpy(both["loss_mask"].astype(np.int64)),
              "pixel_values": torch.from_numpy(np.ascontiguousarray(pixels))}
    model = trainer.model

    def step():
        loss = trainer.training_step(model, inputs)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        return float(loss)

    return step


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as directory:
        policy_dir, reference_dir = os.path.join(directory, "policy"), os.path.join(directory, "reference")
        save_policy_and_reference(policy_dir, reference_dir, args.seed)
        data = make_batch(args.pairs, args.seed)
        sides = {"ours": ours(policy_dir, reference_dir, data),
                 "trl": trl_side(policy_dir, reference_dir, data, not args.no_checkpointing,
                                 os.path.join(directory, "trl"))}
        first = {name: float(jax.block_until_ready(step())) for name, step in sides.items()}  # also compiles
        tokens = int(data["chosen_attention_mask"].sum() + data["rejected_attention_mask"].sum())
        print(f"DPO step, {args.pairs} pairs ({tokens} tokens, T {data['chosen_input_ids'].shape[1]}), TRL gradient "
              f"checkpointing {'off' if args.no_checkpointing else 'on'}; jax {jax.__version__}; {benchlib.load()}")
        print(f"  first-step loss: ours {first['ours']:.7f}, TRL {first['trl']:.7f}, "
              f"relative difference {abs(first['ours'] - first['trl']) / abs(first['trl']):.1e}")
        times, loads = benchlib.interleaved(sides, args.repeats, sync=jax.block_until_ready)
        medians = benchlib.report(times, loads, baseline="trl")
        print(f"  time ours/TRL = {medians['ours'] / medians['trl']:.2f}")


if __name__ == "__main__":
    main()
