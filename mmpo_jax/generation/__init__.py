"""Decoding: KV-cache generation (greedy, temperature, top-p) with pluggable logits processors."""

from mmpo_jax.generation.decode import GenerationOutput, generate
from mmpo_jax.generation.sampling import (
    BanTokens,
    LogitsProcessor,
    ProcessorChain,
    PromptInputs,
    StepInputs,
    sampling_logits,
    select_tokens,
    top_p_filter,
)

__all__ = [
    "BanTokens",
    "GenerationOutput",
    "LogitsProcessor",
    "ProcessorChain",
    "PromptInputs",
    "StepInputs",
    "generate",
    "sampling_logits",
    "select_tokens",
    "top_p_filter",
]
