"""FiSAO (seed 004, METHODS.md section 6, [our choice] design): on-policy PPO with token rewards
from a CLIP verifier (beta_kl 0.05, gamma 1, clip 0.2, group baseline over 10 position bins).

Trained by ``mmpo_jax.training.fisao_loop.train_fisao``, not by the preference trainer. One
``train`` step is one rollout batch: ``data.batch_size`` samples, i.e. ``data.batch_size /
rollout.num_samples`` prompts of ``data.split`` with ``rollout.num_samples`` samples each at
``rollout.temperature`` (1.0), at most ``rollout.max_new_tokens`` tokens, then
``rollout.ppo_epochs`` PPO updates over the whole batch (the optimizer takes
``train.num_steps * rollout.ppo_epochs`` updates). ``rollout.reward_granularity="sentence"`` is
the paper's sentence-level ablation; ``rollout.vocabulary`` names the object words ("shapes_world":
colours x shapes; "coco": COCO-80 with CHAIR's synonyms, for real data).

Shapes world: the verifier is a word-level tiny CLIP trained once on the ``sft`` split's ground
truth and cached under ``<data.data_dir>/fisao_verifier``; ``(mu_c, mu_h)`` come from captions the
SFT base samples on the ``sft`` tail the verifier never saw, cached under
``<data.data_dir>/fisao_calibration``. Real data: pass ``Verifier.from_hf_clip`` (the CLIP of the
vision tower) and calibration records with ground-truth objects to ``train_fisao``.

Tiny run: 200 rollout steps of 8 prompts x 4 samples, 24 new tokens, 2 PPO epochs, lr 5e-5
[our choice: ~1.5 minutes on a 2-core CPU; of lr 2e-5 / 5e-5 / 1e-4 on the shapes world, 5e-5
lowered sampled CHAIR the most without losing recall, 1e-4 drifted (KL to the SFT base 0.3,
greedy recall down)].
Reference settings ([our choice]): the paper's prompts are the first 8k of LLaVA-Instruct-150k; it
states no optimiser setting usable here; mDPO's LoRA setting with a 10x lower lr for on-policy PPO.
"""

import pathlib

from mmpo_jax.config.loading import config_module

base = config_module(pathlib.Path(__file__).with_name("base.py"))

REFERENCE_SETTINGS = dict(
    source="[our choice] FiSAO states no usable optimiser setting",
    learning_rate=1e-6, num_epochs=1, batch_size=32, schedule="cosine", warmup_ratio=0.1,
    weight_decay=0.05, lora_rank=64, lora_alpha=128.0, lora_dropout=0.05,
    dataset="first 8k prompts of LLaVA-Instruct-150k",
)


def get_config(arg: str | None = None):
    """The tiny shapes-world run (``arg`` unused)."""
    return base.experiment(
        "fisao",
        base.method("fisao", beta_kl=0.05, gamma=1.0, clip_eps=0.2, num_position_bins=10),
        optimizer=dict(learning_rate=5e-5),
        train=dict(num_steps=200),
        rollout=dict(num_samples=4, temperature=1.0, max_new_tokens=24, ppo_epochs=2,
                     reward_granularity="token", vocabulary="shapes_world"),
        reference_settings=REFERENCE_SETTINGS,
    )
