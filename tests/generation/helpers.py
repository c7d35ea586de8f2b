"""Shared pieces of the decoding tests: a left-padded prompt batch, a trace-counting processor, and
cache-free reference forwards of the model over a whole generated sequence."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx, struct

from mmpo_jax.generation import BanTokens, LogitsProcessor, ProcessorChain
from tests.models.hf_fixtures import IMAGE_TOKEN_ID

PAD = 0
TRACES = []
"""One entry per trace of a decode program that uses `CountTraces` (a Python side effect)."""


@struct.dataclass
class CountTraces(LogitsProcessor):
    """Identity processor that records every trace of the decode program in `TRACES`."""

    def __call__(self, logits, step, state):
        TRACES.append(step)
        return logits, state


COUNT_AND_BAN_IMAGE = ProcessorChain((CountTraces(), BanTokens(jnp.array([IMAGE_TOKEN_ID]))))
"""Counts traces and keeps generated sequences re-scorable with their images; one processor structure
for every test, so that decodes of the same kind share their compilation across test modules."""


def left_padded_prompts(num_image_tokens: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two prompts of different lengths with one image each, left-padded: `(input_ids, mask)`, int `[2, T]`."""
    rows = [
        [1, 5, 6, *[IMAGE_TOKEN_ID] * num_image_tokens, *rng.integers(3, 90, 4)],
        [1, 7, *[IMAGE_TOKEN_ID] * num_image_tokens, *rng.integers(3, 90, 2)],
    ]
    length = max(len(row) for row in rows)
    input_ids = np.array([[PAD] * (length - len(row)) + row for row in rows])
    mask = np.array([[0] * (length - len(row)) + [1] * len(row) for row in rows])
    return input_ids, mask


@nnx.jit(static_argnames=("probe",))
def _forward(model, input_ids, pixels, mask, hooks, probe):
    output = model(input_ids, pixel_values=pixels, attention_mask=mask, hooks=hooks, probe=probe)
    return output.logits, output.probes


def reference_forward(setup, sequences, pixels, *, hooks=None, probe=None):
    """One forward over `sequences [B, T + M]` minus the last token (never fed back in decoding).

    Returns `(logits [B, M, V] at the positions choosing the new tokens, probes {layer: [B, T+M-1, N]})`.
    """
    prompt_length = setup["input_ids"].shape[1]
    sequences = np.asarray(sequences)[:, :-1]
    new = sequences.shape[1] - prompt_length + 1
    mask = np.concatenate([setup["mask"], np.ones((len(sequences), new - 1), bool)], axis=1)
    logits, probes = _forward(setup["model"], jnp.asarray(sequences), pixels, jnp.asarray(mask), hooks, probe)
    return np.array(logits[:, prompt_length - 1:]), probes


def log_softmax(logits: np.ndarray) -> np.ndarray:
    return np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
