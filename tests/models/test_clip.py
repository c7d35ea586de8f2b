"""CLIP towers: parity with transformers' PyTorch CLIPModel, conv stem, remat, merge_tokens."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from mmpo_jax.models.clip import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextTransformer,
    CLIPVisionConfig,
    CLIPVisionTransformer,
    merge_tokens,
)

VISION = CLIPVisionConfig(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    layer_norm_eps=1e-5,
)
TEXT = CLIPTextConfig(
    vocab_size=120,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
)
PROJECTION_DIM = 24


def assert_close(actual, expected, rtol: float = 1e-4):
    """|actual - expected| <= rtol * max|expected| elementwise: relative to the tensor's scale, so
    entries near zero do not demand more digits than float32 arithmetic in a different order has."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale)


def torch_key(path: tuple) -> str:
    """Our parameter path -> transformers' state_dict key (our leaf names are flax's)."""
    *module, leaf = (str(p) for p in path)
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    return ".".join([*module, leaf])


def copy_torch_weights(model: nnx.Module, torch_module: torch.nn.Module, prefix: str = "") -> None:
    """Load a transformers CLIP module's weights into our model (test-local; convert.py is M3's)."""
    torch_state = {k: v.detach().numpy() for k, v in torch_module.state_dict().items()}
    params = nnx.state(model, nnx.Param)
    flat = nnx.to_flat_state(params)
    used = set()
    for path, variable in flat:
        key = prefix + torch_key(path)
        value = torch_state[key]
        if value.ndim == 2 and path[-1] == "kernel":
            value = value.T  # torch Linear [out, in] -> ours [in, out]
        elif value.ndim == 4:
            # torch Conv [out, in, kh, kw] -> ours [kh, kw, in, out]
            value = value.transpose(2, 3, 1, 0)
        assert value.shape == variable.shape, (key, value.shape, variable.shape)
        variable.set_value(jnp.asarray(value))
        used.add(key)
    nnx.update(model, nnx.from_flat_state(flat))
    unused = {k for k in torch_state if k.startswith(prefix)} - used - {
        prefix + "text_model.embeddings.position_ids",
        prefix + "vision_model.embeddings.position_ids",
    }
    assert not unused, f"torch parameters not copied: {sorted(unused)}"


def hf_clip(eos_token_id: int) -> transformers.CLIPModel:
    """A tiny random transformers CLIPModel matching VISION/TEXT, weights scaled so every
    parameter (LayerNorm scales and biases included) matters."""
    text = dataclasses.asdict(TEXT)
    vision = dataclasses.asdict(VISION)
    keep_text = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "max_position_embeddings", "layer_norm_eps", "hidden_act")
    keep_vision = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "image_size", "patch_size", "num_channels", "layer_norm_eps", "hidden_act")
    config = transformers.CLIPConfig(
        text_config={**{k: text[k] for k in keep_text}, "eos_token_id": eos_token_id},
        vision_config={k: vision[k] for k in keep_vision},
        projection_dim=PROJECTION_DIM,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name == "logit_scale":
                param.fill_(1.7)
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(0.2 * torch.randn_like(param))
    return model


def ours(eos_token_id: int, hf: transformers.CLIPModel) -> CLIPModel:
    config = CLIPConfig(
        vision_config=VISION,
        text_config=dataclasses.replace(TEXT, eos_token_id=eos_token_id),
        projection_dim=PROJECTION_DIM,
    )
    model = CLIPModel(config, rngs=nnx.Rngs(1))
    copy_torch_weights(model, hf)
    return model


@pytest.fixture(scope="module")
def legacy_pair():
    """eos_token_id=2: transformers pools at the largest token id."""
    hf = hf_clip(eos_token_id=2)
    return hf, ours(2, hf)


def pixels(n: int = 3, seed: int = 0) -> np.ndarray:
    size = (n, VISION.image_size, VISION.image_size, 3)
    return np.random.default_rng(seed).normal(size=size).astype(np.float32)


def text_batch(eos_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded batch of 3 with lengths 9, 5, 12 (of 12); pad id 0; each row ends with EOS.

    For a non-legacy EOS the pad id is the EOS id too, as in CLIP tokenizers, so only the
    *first* EOS is the right pooling position.
    """
    rng = np.random.default_rng(1)
    lengths = (9, 5, 12)
    eos = eos_token_id if eos_token_id != 2 else TEXT.vocab_size - 1
    pad = eos if eos_token_id != 2 else 0
    ids = np.full((3, 12), pad, np.int32)
    mask = np.zeros((3, 12), np.int32)
    for row, length in enumerate(lengths):
        words = rng.integers(3, eos if eos_token_id == 2 else TEXT.vocab_size, length - 1)
        ids[row, : length - 1] = np.where(words == eos, 3, words)
        ids[row, length - 1] = eos
        mask[row, :length] = 1
    return ids, mask


def test_vision_hidden_states_and_pooled_match_transformers(legacy_pair):
    hf, model = legacy_pair
    images = pixels()
    with torch.no_grad():
        channel_first = torch.from_numpy(images.transpose(0, 3, 1, 2))
        expected = hf.vision_model(channel_first, output_hidden_states=True)
    out = model.vision_model(jnp.asarray(images))
    assert len(out.hidden_states) == VISION.num_hidden_layers + 1 == len(expected.hidden_states)
    for got, want in zip(out.hidden_states, expected.hidden_states):
        assert_close(got, want)
    assert_close(out.last_hidden_state, expected.last_hidden_state)
    assert_close(out.pooler_output, expected.pooler_output)
    assert model.vision_model.grid_size == 4
    assert out.last_hidden_state.shape == (3, 1 + 16, VISION.hidden_size)


def test_image_features_match_transformers_and_jit(legacy_pair):
    hf, model = legacy_pair
    images = pixels(seed=2)
    with torch.no_grad():
        channel_first = torch.from_numpy(images.transpose(0, 3, 1, 2))
        expected = hf.get_image_features(channel_first).pooler_output
    eager = model.get_image_features(jnp.asarray(images))
    jitted = nnx.jit(lambda m, x: m.get_image_features(x))(model, jnp.asarray(images))
    assert eager.shape == (3, PROJECTION_DIM)
    assert_close(eager, expected)
    assert_close(jitted, expected)
    assert float(model.logit_scale[...]) == pytest.approx(1.7)


@pytest.mark.parametrize("eos_token_id", [2, 7])
def test_text_features_with_padding_match_transformers(eos_token_id, legacy_pair):
    if eos_token_id == 2:
        hf, model = legacy_pair
    else:
        hf = hf_clip(eos_token_id)
        model = ours(eos_token_id, hf)
    ids, mask = text_batch(eos_token_id)
    with torch.no_grad():
        torch_ids, torch_mask = torch.from_numpy(ids).long(), torch.from_numpy(mask)
        want_text = hf.text_model(torch_ids, attention_mask=torch_mask)
        want_features = hf.get_text_features(torch_ids, torch_mask).pooler_output
    got = model.text_model(jnp.asarray(ids), jnp.asarray(mask))
    assert_close(got.last_hidden_state, want_text.last_hidden_state)
    assert_close(got.pooler_output, want_text.pooler_output)
    text_features = nnx.jit(lambda m, i, a: m.get_text_features(i, a))
    features = text_features(model, jnp.asarray(ids), jnp.asarray(mask))
    assert_close(features, want_features)


def test_text_pooling_ignores_right_padding(legacy_pair):
    _, model = legacy_pair
    ids, mask = text_batch(2)
    short = model.get_text_features(jnp.asarray(ids[1:2, :5]))
    padded = model.get_text_features(jnp.asarray(ids[1:2]), jnp.asarray(mask[1:2]))
    assert_close(padded, short)


def test_text_longer_than_positions_is_rejected(legacy_pair):
    _, model = legacy_pair
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model.text_model(jnp.zeros((1, 17), jnp.int32))


def test_wrong_image_size_is_rejected(legacy_pair):
    _, model = legacy_pair
    with pytest.raises(ValueError, match=r"expected \[N, 32, 32, 3\]"):
        model.vision_model(jnp.zeros((1, 3, 32, 32)))


CONV = CLIPVisionConfig(
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    image_size=64,
    patch_size=8,
    stem="conv",
    conv_channels=(8, 16, 32, 32),
    token_merge=2,
)


@pytest.mark.slow
def test_conv_stem_grid_and_gradient():
    model = CLIPVisionTransformer(CONV, rngs=nnx.Rngs(0))
    stem = model.embeddings.conv_stem
    kernels = [conv.kernel.shape for conv in stem.convs]
    assert kernels == [(3, 3, 3, 8), (3, 3, 8, 16), (3, 3, 16, 32), (3, 3, 32, 32)]
    assert stem.projection.kernel.shape == (32, 48)  # last width 32 != hidden 48
    assert not hasattr(model.embeddings, "patch_embedding")
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)

    @nnx.jit
    def forward_and_grad(m):
        def loss(m):
            out = m(images)
            return jnp.mean(out.last_hidden_state[:, 1:] ** 2), out

        return nnx.grad(loss, has_aux=True)(m)

    grads, out = forward_and_grad(model)
    assert model.grid_size == 8
    assert out.last_hidden_state.shape == (2, 1 + 64, 48)
    merged = merge_tokens(out.last_hidden_state[:, 1:], model.grid_size, CONV.token_merge)
    assert merged.shape == (2, 16, 4 * 48)
    for index in range(len(CONV.conv_channels)):
        kernel = np.asarray(grads.embeddings.conv_stem.convs[index].kernel[...])
        assert np.all(np.isfinite(kernel)) and np.abs(kernel).max() > 0


def test_conv_stem_without_projection_when_widths_agree():
    config = dataclasses.replace(
        CONV, hidden_size=32, image_size=16, patch_size=2, conv_channels=(8, 32)
    )
    model = CLIPVisionTransformer(config, rngs=nnx.Rngs(0))
    assert model.embeddings.conv_stem.projection is None
    assert model(jnp.zeros((1, 16, 16, 3))).last_hidden_state.shape == (1, 1 + 8 * 8, 32)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(patch_size=4), "set patch_size=8"),
        (dict(stem="vit"), "expected one of"),
        (dict(token_merge=3), "token_merge=3"),
        (dict(image_size=60), "image_size=60"),
    ],
)
def test_vision_config_rejects_inconsistent_options(changes, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CONV, **changes)


@pytest.mark.slow
def test_remat_matches_plain_forward_and_gradient():
    plain = CLIPVisionTransformer(VISION, rngs=nnx.Rngs(3))
    remat = CLIPVisionTransformer(dataclasses.replace(VISION, remat=True), rngs=nnx.Rngs(3))
    images = jnp.asarray(pixels(2, seed=4))

    @nnx.jit
    def loss_and_grad(m):
        return nnx.value_and_grad(lambda m: jnp.mean(m(images).pooler_output ** 2))(m)

    loss_plain, grad_plain = loss_and_grad(plain)
    loss_remat, grad_remat = loss_and_grad(remat)
    assert_close(loss_remat, loss_plain)
    # One scale for all gradients: some entries (e.g. pre-LayerNorm mean directions) are zero up to
    # rounding, and a per-leaf relative test would compare noise with noise.
    flatten = lambda g: np.concatenate([np.ravel(x) for x in jax.tree.leaves(nnx.state(g))])
    assert_close(flatten(grad_remat), flatten(grad_plain))


def test_text_tower_standalone_and_bfloat16_compute():
    config = dataclasses.replace(TEXT, dtype="bfloat16")
    model = CLIPTextTransformer(config, rngs=nnx.Rngs(0))
    out = model(jnp.ones((2, 6), jnp.int32))
    assert out.last_hidden_state.dtype == jnp.bfloat16
    assert model.embeddings.token_embedding.embedding.dtype == jnp.float32
    assert out.pooler_output.shape == (2, TEXT.hidden_size)


def test_merge_tokens_groups_blocks_row_major():
    # 4x4 grid, each patch's features = (index, 100 + index) so the order is readable.
    index = np.arange(16, dtype=np.float32)
    features = jnp.asarray(np.stack([index, 100 + index], axis=-1)[None])  # [1, 16, 2]
    merged = np.asarray(merge_tokens(features, grid_size=4, factor=2))
    blocks = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    expected = np.array([[[v for p in b for v in (p, 100 + p)] for b in blocks]], np.float32)
    np.testing.assert_array_equal(merged, expected)
    np.testing.assert_array_equal(merge_tokens(features, 4, 1), features)


def test_merge_tokens_rejects_indivisible_grid():
    message = r"factor=4 must be >= 1 and divide grid_size=6 \(valid factors: \[1, 2, 3, 6\]\)"
    with pytest.raises(ValueError, match=message):
        merge_tokens(jnp.zeros((1, 36, 8)), grid_size=6, factor=4)
    with pytest.raises(ValueError, match="holds? 15 patches"):
        merge_tokens(jnp.zeros((1, 15, 8)), grid_size=4, factor=2)


def test_parameters_carry_logical_axis_names(legacy_pair):
    _, model = legacy_pair
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = variable.get_metadata().get("out_sharding")
        assert names is not None and len(names) == variable.ndim, (path, names)
    attn = model.vision_model.encoder.layers[0].self_attn
    assert attn.q_proj.kernel.get_metadata()["out_sharding"] == ("embed", "heads")
    assert attn.out_proj.kernel.get_metadata()["out_sharding"] == ("heads", "embed")
    token = model.text_model.embeddings.token_embedding.embedding
    assert token.get_metadata()["out_sharding"] == ("vocab", "embed")
