"""FiSAO (seed 004, METHODS.md section 6, [our choice] design): on-policy PPO with token rewards
from the model's own vision encoder as verifier (beta_kl 0.05, gamma 1, clip 0.2, group baseline
over 10 position bins).

``rollout`` (4 samples per prompt at temperature 1, 24 new tokens, 2 PPO epochs per batch,
token-level rewards, the shapes-world object vocabulary) is read by the on-policy loop, which
arrives with the on-policy issue; until then `validate` with the dataset's features says so.
Tiny run: 200 steps of 32 prompts at lr 1e-5 [our choice].
Reference settings ([our choice]): the paper's prompts are the first 8k of LLaVA-Instruct-150k; it
states no optimiser setting usable here; mDPO's LoRA setting with a 10x lower lr for on-policy PPO.
"""

import pathlib

from mmpo_jax.training.config_loading import config_module

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
        optimizer=dict(learning_rate=1e-5),
        train=dict(num_steps=200),
        rollout=dict(num_samples=4, temperature=1.0, max_new_tokens=24, ppo_epochs=2,
                     reward_granularity="token", vocabulary="shapes_world"),
        reference_settings=REFERENCE_SETTINGS,
    )
