"""Decoding: KV-cache generation (greedy, sampling, top-p) with pluggable logits processors, row groups
(contrastive decoding) and decode controllers (ADAPT's attention-supervised inference)."""

from mmpo_jax.generation.adapt import ADAPT_MODES, AdaptDecoding, AdaptState
from mmpo_jax.generation.contrastive import ContrastiveRows, contrastive_generate, contrastive_logits
from mmpo_jax.generation.decode import DecodeController, GenerationOutput, RowGroups, generate
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
    "ADAPT_MODES",
    "AdaptDecoding",
    "AdaptState",
    "BanTokens",
    "ContrastiveRows",
    "DecodeController",
    "GenerationOutput",
    "LogitsProcessor",
    "ProcessorChain",
    "PromptInputs",
    "RowGroups",
    "StepInputs",
    "contrastive_generate",
    "contrastive_logits",
    "generate",
    "sampling_logits",
    "select_tokens",
    "top_p_filter",
]
