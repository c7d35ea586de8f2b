"""The SFT base's vision tower trained alone on v2's per-cell labels (`training.vision_pretrain`)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from mmpo_jax.config.loading import load_config
from mmpo_jax.data import image_processing, shapes_world_v2 as w2
from mmpo_jax.data import shapes_world_v2_splits as s2
from mmpo_jax.data.tokenizer import build_word_tokenizer
from mmpo_jax.models import presets
from mmpo_jax.models.llava import Llava
from mmpo_jax.training.experiment import sft_base_config
from mmpo_jax.training.vision_pretrain import pretrain_vision

SPEC = w2.WorldSpecV2(sft_size=16)


def _model() -> Llava:
    tokenizer = build_word_tokenizer(w2.vocabulary(SPEC), model_max_length=512)
    config = presets.tiny_v2(vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return Llava(config, rngs=nnx.Rngs(0))


def _params(module) -> dict:
    return jax.device_get(nnx.to_pure_dict(nnx.state(module, nnx.Param)))


def test_the_tower_alone_learns_and_the_language_model_is_untouched():
    model = _model()
    records = list(s2.generate_split(SPEC, "sft"))
    image_config = image_processing.for_shapes_world(SPEC.metadata())
    tower, language = _params(model.vision_tower), _params(model.language_model)
    report = pretrain_vision(model, records, image_config, SPEC.metadata(), steps=2, batch_size=4,
                             learning_rate=1e-3, seed=0, held_out=records[:3])
    assert np.isfinite(report["loss"])
    for name in ("shape_accuracy", "colour_accuracy", "background_accuracy"):
        assert 0.0 <= report[name] <= 1.0
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), tower, _params(model.vision_tower))
    assert any(jax.tree.leaves(moved))
    unchanged = jax.tree.map(np.array_equal, language, _params(model.language_model))
    assert all(jax.tree.leaves(unchanged))


def test_v1_has_no_cell_labels():
    with pytest.raises(ValueError, match=r"sft_base.vision_steps=2 needs the shapes world v2"):
        pretrain_vision(_model(), [], None, {"world": "v1"}, steps=2, batch_size=4, learning_rate=1e-3, seed=0)


def test_the_v2_config_freezes_the_pretrained_tower_in_the_sft():
    base = sft_base_config(load_config("configs/shapes_world_v2.py:catpo"))
    assert base.sft_base.vision_steps > 0 and base.model.freeze_vision
    assert not sft_base_config(load_config("configs/catpo.py")).model.freeze_vision  # v1: from scratch


def test_the_batches_read_ahead_are_those_read_in_turn():
    """The reading thread changes nothing: two runs from one seed end on the same tower."""
    records = list(s2.generate_split(SPEC, "sft"))
    image_config = image_processing.for_shapes_world(SPEC.metadata())
    towers = []
    for _ in range(2):
        model = _model()
        pretrain_vision(model, records, image_config, SPEC.metadata(), steps=3, batch_size=2,
                        learning_rate=1e-3, seed=1)
        towers.append(_params(model.vision_tower))
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, *towers)))


def test_the_towers_batch_size_is_its_own_or_the_sfts():
    from mmpo_jax.config import checks

    config = load_config("configs/shapes_world_v2.py:catpo", ["sft_base.vision_batch_size=-1"])
    assert any("sft_base.vision_batch_size=-1 must lie in [0, inf]" in p for p in checks.problems(config))
    assert load_config("configs/catpo.py").sft_base.vision_batch_size == 0  # 0: sft_base.batch_size
