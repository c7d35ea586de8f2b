"""Per-example randomness of the data pipelines: keys, image interventions, P2-DPO's stored noise.

Per-example randomness (mDPO's corrupted crop, the noise image) comes from a PRNG key folded from
``(seed, epoch, record index, extra name)``: a resumed run draws exactly the same corruptions.
P2-DPO's robustness pair is the exception: it is scored on the ``I_noise`` its ``y_l`` was sampled
from, which ``noise_image`` rebuilds from the pair's stored ``noise_key``.
"""

from __future__ import annotations

import functools
import json
import zlib
from typing import Any, Callable, Mapping

import jax
import numpy as np

from mmpo_jax.data import interventions
from mmpo_jax.data.image_processing import ImageProcessorConfig


def example_key(seed: jax.Array, epoch: jax.Array, record_index: jax.Array, stream: str
                ) -> jax.Array:
    """The PRNG key of one example's randomness for ``stream`` (e.g. ``"corrupt_pixel_values"``).

    ``key(seed)`` folded with the epoch, the record index and ``crc32(stream)``, so it does not
    depend on the order, thread or process in which the example is prepared. Traceable.
    """
    key = jax.random.key(seed)
    for data in (epoch, record_index, zlib.crc32(stream.encode())):
        key = jax.random.fold_in(key, data)
    return key


INTERVENTIONS = {"corrupt_pixel_values": interventions.random_resized_crop,
                 "noise_pixel_values": interventions.add_diffusion_noise}


# Interventions that need the image's normalisation constants (the noise is defined in CLIP units).
_NORMALISATION_AWARE = frozenset({"noise_pixel_values"})


@functools.cache
def _jitted_intervention(name: str, options: tuple[tuple[str, Any], ...]
                         ) -> Callable[..., jax.Array]:
    def apply(seed, epoch, record_index, image):
        return INTERVENTIONS[name](example_key(seed, epoch, record_index, name), image,
                                    **dict(options))
    return jax.jit(apply)


def intervene(name: str, image: np.ndarray, *, seed: int, epoch: int, record_index: int,
              image_config: ImageProcessorConfig, **options: Any) -> np.ndarray:
    """``INTERVENTIONS[name]`` on one preprocessed image with its example key, on the host CPU.

    ``image_config`` gives the image's normalisation constants; ``options`` go to the
    intervention (e.g. the noise's ``step``). Jitted once per image shape and options; the
    arguments are committed to the CPU so that data workers never touch the accelerator the
    training step runs on, and so that the same inputs give the same bits wherever it is called.
    """
    if name in _NORMALISATION_AWARE:
        options.update(mean=tuple(image_config.mean), std=tuple(image_config.std))
    # the filler row's index -1 wraps to 2**32 - 1, an index no record has
    args = (np.uint32(seed), np.uint32(epoch), np.uint32(int(record_index) % 2**32), image)
    apply = _jitted_intervention(name, tuple(sorted(options.items())))
    return np.asarray(apply(*jax.device_put(args, jax.devices("cpu")[0])))


def noise_image(pixel_values: np.ndarray, *, seed: int, record_index: int, step: int,
                image_config: ImageProcessorConfig) -> np.ndarray:
    """P2-DPO's ``I_noise`` of one generated pair: diffusion noise at ``step`` with the key of
    ``(seed, epoch 0, record_index, "noise_pixel_values")``, on the host CPU.

    Pair generation (``pipelines.p2dpo``) samples the robustness pair's ``y_l`` on this image and
    stores ``noise_key(seed, record_index, step)`` with the pair; ``robust_pair`` rebuilds it from
    that key with the same function, inputs and device, so the trainer scores the pair on the
    bit-identical image [our choice: a key of three integers instead of the float32 image itself,
    ~200 KB a record at 128 px].

    Args:
      pixel_values: float32 ``[H, W, 3]``, the record's image through ``image_config``.
    """
    return intervene("noise_pixel_values", pixel_values, seed=seed, epoch=0,
                     record_index=record_index, image_config=image_config, step=int(step))


def noise_key(seed: int, record_index: int, step: int) -> str:
    """The ``noise_key`` record field of a generated pair: JSON ``{"index", "seed", "step"}``."""
    return json.dumps({"index": int(record_index), "seed": int(seed), "step": int(step)},
                      sort_keys=True)


def stored_noise(record: Mapping[str, Any], pixel_values: np.ndarray,
                 image_config: ImageProcessorConfig) -> np.ndarray:
    """``noise_image`` from a record's ``noise_key`` (a one-line error when it has none)."""
    try:
        key = json.loads(record["noise_key"])
        options = dict(seed=int(key["seed"]), record_index=int(key["index"]),
                       step=int(key["step"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"record {record.get('id', '?')!r}: the robustness pair needs noise_key, JSON "
            f"{{\"seed\", \"index\", \"step\"}} of the I_noise it was generated on (pair "
            f"generation writes it); got {record.get('noise_key')!r} ({error!r})") from None
    return noise_image(pixel_values, image_config=image_config, **options)
