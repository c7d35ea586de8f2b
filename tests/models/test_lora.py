"""LoRA adapters: exactness at init and when disabled, merge parity, what trains, dropout, saving.

Tiny float32 models (width 32, 1-2 layers); merged-vs-unmerged parity at rtol 1e-5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mmpo_jax.models.clip import CLIPVisionConfig
from mmpo_jax.models.llama import LlamaConfig, LlamaForCausalLM
from mmpo_jax.models.llava import Llava, LlavaConfig
from mmpo_jax.models.lora import (
    LLAMA_LINEAR_NAMES,
    LoraConfig,
    LoRALinear,
    apply_lora,
    load_lora_state,
    lora_layers,
    lora_state,
    merge_lora,
    set_adapters,
    trainable_filter,
    without_adapters,
)
from mmpo_jax.engine.sharding import make_mesh, state_shardings

VOCAB, IMAGE_TOKEN = 64, 63
TEXT = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
VISION = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=16, patch_size=8)
CONFIG = LoraConfig(rank=4, alpha=8.0, dropout=0.0)
IDS = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB - 1, size=(2, 7)), jnp.int32)


def llama(seed: int = 0) -> LlamaForCausalLM:
    return LlamaForCausalLM(TEXT, rngs=nnx.Rngs(seed))


def llava(seed: int = 0) -> Llava:
    config = LlavaConfig(vision_config=VISION, text_config=TEXT, image_token_id=IMAGE_TOKEN, vision_feature_layer=-1)
    return Llava(config, rngs=nnx.Rngs(seed))


def llava_inputs() -> tuple[jax.Array, jax.Array]:
    """input_ids [2, 8] with the 4 placeholders of one 16x16 image per row, pixel_values [2, 16, 16, 3]."""
    ids = np.array(IDS[:, :4])
    ids = np.concatenate([ids[:, :2], np.full((2, 4), IMAGE_TOKEN), ids[:, 2:]], axis=1)
    pixels = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
    return jnp.asarray(ids, jnp.int32), jnp.asarray(pixels)


def perturb_b(model: nnx.Module, seed: int = 3, scale: float = 0.1) -> None:
    """Give every adapter a non-zero B (at init B = 0 and the adapter is a no-op)."""
    for index, layer in enumerate(lora_layers(model)):
        key = jax.random.fold_in(jax.random.key(seed), index)
        layer.lora_b[...] = scale * jax.random.normal(key, layer.lora_b.shape)


def logits(model: nnx.Module, ids: jax.Array = IDS) -> np.ndarray:
    return np.asarray(model(ids)[0])


def flat_paths(state: nnx.State) -> set[tuple]:
    return {path for path, _ in nnx.to_flat_state(state)}


def test_zero_b_keeps_the_base_output_and_the_base_variables():
    model = llama()
    base_logits = logits(model)
    kernel = model.model.layers[0].self_attn.q_proj.kernel
    apply_lora(model, CONFIG, rngs=nnx.Rngs(1))
    adapted = model.model.layers[0].self_attn.q_proj
    assert isinstance(adapted, LoRALinear) and adapted.kernel is kernel
    assert len(lora_layers(model)) == len(LLAMA_LINEAR_NAMES) * TEXT.num_hidden_layers
    assert not isinstance(model.lm_head, LoRALinear)
    np.testing.assert_array_equal(logits(model), base_logits)  # B = 0 adds exact zeros


def test_disabled_adapters_give_the_base_output_exactly():
    base_logits = logits(llama())
    model = apply_lora(llama(), CONFIG, rngs=nnx.Rngs(1))
    perturb_b(model)
    adapted_logits = logits(model)
    assert np.abs(adapted_logits - base_logits).max() > 1e-2
    np.testing.assert_array_equal(logits(without_adapters(model)), base_logits)
    np.testing.assert_array_equal(logits(model), adapted_logits)  # the view left the model alone
    set_adapters(model, False)
    np.testing.assert_array_equal(logits(model), base_logits)
    set_adapters(model, True)
    np.testing.assert_array_equal(logits(model), adapted_logits)


def test_merged_weights_reproduce_the_adapted_model_with_the_base_tree():
    base = llama()
    model = apply_lora(llama(), CONFIG, rngs=nnx.Rngs(1))
    perturb_b(model)
    adapted_logits = logits(model)
    merged = merge_lora(nnx.clone(model))
    assert not lora_layers(merged)
    np.testing.assert_allclose(logits(merged), adapted_logits, rtol=1e-5, atol=1e-5)
    # Exactly the parameter tree (paths, shapes, logical names) and static structure of the base model.
    assert nnx.graphdef(merged) == nnx.graphdef(base)
    merged_flat, base_flat = dict(nnx.to_flat_state(nnx.state(merged))), dict(nnx.to_flat_state(nnx.state(base)))
    assert merged_flat.keys() == base_flat.keys()
    for path, variable in base_flat.items():
        assert merged_flat[path].shape == variable.shape
        assert merged_flat[path].get_metadata().get("out_sharding") == variable.get_metadata().get("out_sharding")
    # The kernel is W + (alpha / r) A B.
    layer = model.model.layers[1].mlp.down_proj
    expected = layer.kernel[...] + CONFIG.scaling * layer.lora_a[...] @ layer.lora_b[...]
    np.testing.assert_allclose(merged.model.layers[1].mlp.down_proj.kernel[...], expected, rtol=1e-6, atol=1e-7)


def test_restricted_targets_touch_only_those_layers():
    model = apply_lora(llama(), LoraConfig(rank=2, alpha=2.0, targets=("q_proj", "v_proj")), rngs=nnx.Rngs(1))
    for layer in model.model.layers:
        for name in LLAMA_LINEAR_NAMES:
            parent = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            assert isinstance(getattr(parent, name), LoRALinear) == (name in ("q_proj", "v_proj")), name
    paths = flat_paths(lora_state(model))
    assert {path[-2] for path in paths} == {"q_proj", "v_proj"}
    assert len(paths) == 2 * 2 * TEXT.num_hidden_layers


def test_llava_adapts_only_the_language_model_and_trains_the_projector_on_request():
    ids, pixels = llava_inputs()
    model = llava()
    config = LoraConfig(rank=4, alpha=8.0, train_projector=True)
    apply_lora(model, config, rngs=nnx.Rngs(1))
    assert not [layer for _, layer in nnx.iter_modules(model.vision_tower) if isinstance(layer, LoRALinear)]
    assert not [layer for _, layer in nnx.iter_modules(model.multi_modal_projector) if isinstance(layer, LoRALinear)]
    perturb_b(model)

    def loss(model: Llava) -> jax.Array:
        return jnp.mean(model(ids, pixel_values=pixels).logits ** 2)

    for train_projector in (False, True):
        filter_ = trainable_filter(LoraConfig(rank=4, alpha=8.0, train_projector=train_projector))
        _, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, filter_))(model)
        paths = flat_paths(grads)
        expected = flat_paths(nnx.state(model, nnx.LoRAParam))
        if train_projector:
            expected |= {("multi_modal_projector",) + path for path in flat_paths(nnx.state(model.multi_modal_projector))}
        assert paths == expected
        assert not any(path[0] == "vision_tower" for path in paths)
        for path, gradient in nnx.to_flat_state(grads):
            assert np.abs(np.asarray(gradient[...])).max() > 0, path


def test_only_adapters_get_gradients_and_both_factors_move():
    model = apply_lora(llama(), CONFIG, rngs=nnx.Rngs(1))
    perturb_b(model)

    def loss(model: LlamaForCausalLM) -> jax.Array:
        return jnp.mean(jax.nn.log_softmax(model(IDS)[0])[..., 0])

    _, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, trainable_filter(CONFIG)))(model)
    assert flat_paths(grads) == flat_paths(nnx.state(model, nnx.LoRAParam))
    assert {path[-1] for path in flat_paths(grads)} == {"lora_a", "lora_b"}
    for path, gradient in nnx.to_flat_state(grads):
        assert np.abs(np.asarray(gradient[...])).max() > 0, path


def test_dropout_acts_in_training_mode_only_and_follows_the_rngs():
    def adapted(seed: int) -> LlamaForCausalLM:
        model = apply_lora(llama(), LoraConfig(rank=4, alpha=8.0, dropout=0.5), rngs=nnx.Rngs(seed))
        perturb_b(model)
        return model

    model = adapted(1)
    eval_logits = logits(model)
    np.testing.assert_array_equal(logits(model), eval_logits)  # created in eval mode: deterministic
    model.train()
    first, second = logits(model), logits(model)
    assert np.abs(first - eval_logits).max() > 1e-3
    assert np.abs(first - second).max() > 1e-3  # the dropout stream advances
    twin = adapted(1)
    twin.train()
    np.testing.assert_array_equal(logits(twin), first)  # same rngs, same masks
    np.testing.assert_array_equal(logits(without_adapters(twin)), logits(llama()))  # no adapter, no dropout
    model.eval()
    np.testing.assert_array_equal(logits(model), eval_logits)


def test_adapters_alone_round_trip_through_a_pure_dict():
    source = apply_lora(llama(), CONFIG, rngs=nnx.Rngs(1))
    perturb_b(source)
    saved = jax.tree.map(np.asarray, nnx.to_pure_dict(lora_state(source)))
    assert {path[-1] for path, _ in nnx.to_flat_state(lora_state(source))} == {"lora_a", "lora_b"}
    # As orbax/json give it back: layer indices as strings.
    restored = {"model": {"layers": {str(index): layer for index, layer in saved["model"]["layers"].items()}}}
    target = apply_lora(llama(), CONFIG, rngs=nnx.Rngs(7))  # same base weights, other adapters
    assert np.abs(logits(target) - logits(source)).max() > 1e-2
    load_lora_state(target, restored)
    np.testing.assert_array_equal(logits(target), logits(source))

    other_rank = apply_lora(llama(), LoraConfig(rank=2, alpha=8.0), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="shape"):
        load_lora_state(other_rank, saved)
    fewer = apply_lora(llama(), LoraConfig(rank=4, alpha=8.0, targets=("q_proj",)), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="unexpected"):
        load_lora_state(fewer, saved)


def test_jit_retraces_when_adapters_are_toggled():
    model = apply_lora(llama(), CONFIG, rngs=nnx.Rngs(1))
    perturb_b(model)
    eager_adapted, eager_base = logits(model), logits(without_adapters(model))
    traces = []

    @nnx.jit
    def policy_and_reference(model: LlamaForCausalLM, ids: jax.Array):
        traces.append(1)
        return model(ids)[0], without_adapters(model)(ids)[0]

    adapted, reference = policy_and_reference(model, IDS)
    np.testing.assert_allclose(adapted, eager_adapted, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(reference, eager_base, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(adapted) - np.asarray(reference)).max() > 1e-2
    policy_and_reference(model, IDS)
    assert len(traces) == 1
    set_adapters(model, False)
    disabled, _ = policy_and_reference(model, IDS)
    assert len(traces) == 2  # a new trace, not the adapted one reused
    np.testing.assert_allclose(disabled, eager_base, rtol=1e-5, atol=1e-6)


def test_adapters_carry_logical_axis_names_and_shard():
    model = apply_lora(llama(), CONFIG, rngs=nnx.Rngs(1))
    for layer in lora_layers(model):
        in_axis, out_axis = layer.kernel.get_metadata()["out_sharding"]
        # the large axis takes both kernel axes' names, its own first; the rank axis none
        assert layer.lora_a.get_metadata()["out_sharding"] == ((in_axis, out_axis), None)
        assert layer.lora_b.get_metadata()["out_sharding"] == (None, (out_axis, in_axis))
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    shardings = state_shardings(nnx.state(model, nnx.LoRAParam), mesh)
    attention = shardings["model"]["layers"][0]["self_attn"]
    P = jax.sharding.PartitionSpec
    assert attention["q_proj"]["lora_a"].spec == P(("fsdp", "tensor"), None)  # kernel (embed, heads)
    assert attention["q_proj"]["lora_b"].spec == P(None, ("tensor", "fsdp"))
    assert attention["o_proj"]["lora_a"].spec == P(("tensor", "fsdp"), None)  # kernel (heads, embed)
    assert attention["o_proj"]["lora_b"].spec == P(None, ("fsdp", "tensor"))


def test_lora_a_follows_peft_kaiming_uniform_and_b_starts_at_zero():
    model = apply_lora(llama(), LoraConfig(rank=8, alpha=16.0), rngs=nnx.Rngs(1))
    layer = model.model.layers[0].mlp.down_proj  # in_features = intermediate_size
    bound = 1.0 / np.sqrt(TEXT.intermediate_size)  # kaiming_uniform_(a=sqrt(5)) on torch's [r, in]
    lora_a = np.asarray(layer.lora_a[...])
    assert lora_a.shape == (TEXT.intermediate_size, 8)
    assert np.abs(lora_a).max() <= bound and np.abs(lora_a).max() > 0.9 * bound
    np.testing.assert_array_equal(layer.lora_b[...], 0.0)
    assert layer.scaling == 2.0


def test_errors_name_the_offending_value():
    with pytest.raises(ValueError, match="wq"):
        LoraConfig(rank=4, alpha=8.0, targets=("wq",))
    with pytest.raises(ValueError, match="rank=0"):
        LoraConfig(rank=0, alpha=8.0)
    with pytest.raises(ValueError, match="dropout=1.0"):
        LoraConfig(rank=4, alpha=8.0, dropout=1.0)
    model = apply_lora(llama(), CONFIG, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, CONFIG, rngs=nnx.Rngs(1))
    with pytest.raises(TypeError, match="CLIPVisionTransformer"):
        apply_lora(llava().vision_tower, CONFIG, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="no LoRA"):
        set_adapters(llama(), False)
