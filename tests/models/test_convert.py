"""Checkpoint conversion: transformers directories <-> our models, configs, and the CLI.

Model-level parity of loaded LLaVA models is in test_llava.py; here: every on-disk layout loads to
the same parameters, errors list the offending tensors, exports load in transformers with no
missing or unexpected keys, CLIP parity, and the orbax round trip of the command line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file
from transformers import LlavaConfig as HFLlavaConfig
from transformers import LlavaForConditionalGeneration

from mmpo_jax import convert as convert_cli
from mmpo_jax.engine import model_io
from mmpo_jax.models import presets
from mmpo_jax.models.convert import (
    config_from_hf,
    config_to_hf,
    export_params,
    hub_llava_name,
    llava_tensor_name,
    load_hf_clip,
    load_hf_llava,
    read_safetensors,
    save_hf_llava,
)
from tests.models import hf_fixtures

# The config.json of llava-hf/llava-1.5-7b-hf: sparse, the rest are transformers' defaults.
LLAVA_1_5_7B_HUB_CONFIG = {
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {
        "_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05, "torch_dtype": "float16",
        "vocab_size": 32064,
    },
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {
        "hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
        "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
        "vocab_size": 32000,
    },
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny LLaVA (grouped-query, two feature layers) as transformers saves it: (directory, torch model)."""
    directory = tmp_path_factory.mktemp("saved")
    model = hf_fixtures.save_tiny_llava(directory, seed=7, num_key_value_heads=2, vision_feature_layer=[-1, -2])
    return directory, model


def hub_tensors(directory) -> dict[str, np.ndarray]:
    return {hub_llava_name(name): array for name, array in read_safetensors(directory).items()}


@pytest.mark.parametrize(
    "layout, rename, num_shards",
    [
        ("saved_by_transformers_5", lambda name: name, 1),
        ("llava_hf_hub", hf_fixtures.hub_layout_name, 1),
        ("transformers_5_modules_sharded", hf_fixtures.v5_module_name, 3),
    ],
)
def test_every_layout_loads_the_same_parameters(saved, tmp_path, layout, rename, num_shards):
    directory, _ = saved
    written = hf_fixtures.rewrite_checkpoint(directory, tmp_path / layout, rename, num_shards=num_shards)
    assert any(name.startswith("model.") for name in written) == (layout == "transformers_5_modules_sharded")
    model, config = load_hf_llava(tmp_path / layout)
    assert config.text_config.num_key_value_heads == 2 and config.vision_feature_layer == (-1, -2)
    expected = hub_tensors(directory)
    exported = export_params(model, llava_tensor_name)
    assert sorted(exported) == sorted(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(exported[name], array, err_msg=name)


def test_bfloat16_checkpoint_loads(saved, tmp_path):
    """numpy has no bfloat16; such files are read through ml_dtypes and cast to the parameter dtype."""
    directory, _ = saved
    tensors = hf_fixtures.rewrite_checkpoint(directory, tmp_path / "bf16")
    save_file({n: a.astype(ml_dtypes.bfloat16) for n, a in tensors.items()}, tmp_path / "bf16" / "model.safetensors")
    model, _ = load_hf_llava(tmp_path / "bf16")
    exported = export_params(model, llava_tensor_name)
    for name, array in hub_tensors(directory).items():
        np.testing.assert_array_equal(exported[name], array.astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=name)


def test_missing_and_unexpected_tensors_are_listed(saved, tmp_path):
    directory, _ = saved
    dropped = "language_model.model.layers.1.mlp.up_proj.weight"
    tensors = hf_fixtures.rewrite_checkpoint(directory, tmp_path / "broken", lambda n: None if n == dropped else n)
    extra = dict(tensors, **{"multi_modal_projector.linear_3.weight": np.zeros((2, 2), np.float32)})
    save_file(extra, tmp_path / "broken" / "model.safetensors")
    pattern = rf"missing tensors \[{dropped}\]; unexpected tensors \[multi_modal_projector.linear_3.weight\]"
    with pytest.raises(ValueError, match=pattern.replace(".", r"\.")):
        load_hf_llava(tmp_path / "broken")


def test_shape_mismatch_names_the_tensor(saved, tmp_path):
    directory, _ = saved
    hf_fixtures.rewrite_checkpoint(directory, tmp_path / "wrong", lambda n: n)
    config = json.loads((tmp_path / "wrong" / "config.json").read_text())
    config["text_config"]["intermediate_size"] = 80
    (tmp_path / "wrong" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"gate_proj\.weight has shape \(96, 64\), which gives \(64, 96\) here; "
                                         r"the config expects \(64, 80\)"):
        load_hf_llava(tmp_path / "wrong")


def test_export_loads_in_transformers_with_the_same_logits(saved, tmp_path):
    """Our (perturbed) parameters -> save_hf_llava (sharded) -> transformers: no missing keys, same logits."""
    directory, _ = saved
    model, config = load_hf_llava(directory)
    rng = np.random.default_rng(0)
    perturb = lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32)  # noqa: E731
    nnx.update(model, jax.tree.map(perturb, nnx.state(model, nnx.Param)))
    save_hf_llava(model, config, tmp_path / "exported", max_shard_bytes=40_000)
    assert (tmp_path / "exported" / "model.safetensors.index.json").exists()
    reference, info = LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "exported", output_loading_info=True, attn_implementation="eager"
    )
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    assert not info["mismatched_keys"], info
    pixels = rng.normal(size=(1, 3, 30, 30)).astype(np.float32)
    input_ids = np.array([[1, 5, *[hf_fixtures.IMAGE_TOKEN_ID] * config.num_image_tokens, 9, 11]])
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(input_ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    ours = nnx.jit(lambda m, i, p: m(i, pixel_values=p).logits)(
        model, jnp.asarray(input_ids), jnp.asarray(pixels.transpose(0, 2, 3, 1))
    )
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_clip_embeddings_match_transformers(tmp_path):
    reference = hf_fixtures.save_tiny_clip(tmp_path, seed=3)
    model, config = load_hf_clip(tmp_path)
    assert config.text_config.eos_token_id == hf_fixtures.VOCAB_SIZE - 1
    rng = np.random.default_rng(1)
    pixels = rng.normal(size=(2, 3, 30, 30)).astype(np.float32)
    eos, bos = hf_fixtures.VOCAB_SIZE - 1, hf_fixtures.VOCAB_SIZE - 2
    input_ids = np.array([[bos, 5, 6, 7, eos, 0, 0], [bos, 9, 10, 11, 12, 13, eos]])
    attention_mask = (np.arange(7) < np.array([[5], [7]])).astype(np.int64)
    with torch.no_grad():
        image_expected = reference.get_image_features(pixel_values=torch.tensor(pixels)).pooler_output.numpy()
        text_expected = reference.get_text_features(
            input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask)
        ).pooler_output.numpy()
    image = nnx.jit(lambda m, p: m.get_image_features(p))(model, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    text_features = nnx.jit(lambda m, i, a: m.get_text_features(i, a))
    text = text_features(model, jnp.asarray(input_ids), jnp.asarray(attention_mask))
    for ours, theirs in ((image, image_expected), (text, text_expected)):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())
    assert float(model.logit_scale[...]) == pytest.approx(float(reference.logit_scale.detach()))


def test_command_line_round_trip(saved, tmp_path):
    """import (as a subprocess, the real entry point) -> orbax -> export: the same tensors, loadable."""
    directory, _ = saved
    orbax_dir = tmp_path / "orbax"
    subprocess.run(
        [sys.executable, "-m", "mmpo_jax.convert", "import", str(directory), str(orbax_dir)],
        check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=pathlib.Path(__file__).parents[2],
    )
    assert (orbax_dir / "config.json").exists() and (orbax_dir / "params").is_dir()
    loaded, config = model_io.load_model(orbax_dir)
    assert config == load_hf_llava(directory)[1]
    with pytest.raises(SystemExit, match="no saved tokenizer at .*; pass --tokenizer"):
        convert_cli.main(["export", str(orbax_dir), str(tmp_path / "hf")])  # weights only: no inputs
    convert_cli.main(["export", str(orbax_dir), str(tmp_path / "hf"), "--weights_only"])
    exported = read_safetensors(tmp_path / "hf")
    expected = hub_tensors(directory)
    assert sorted(exported) == sorted(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(exported[name], array, err_msg=name)
    exported_config = HFLlavaConfig(**json.loads((tmp_path / "hf" / "config.json").read_text()))
    assert exported_config.text_config.num_key_value_heads == 2
    with pytest.raises(FileExistsError, match="already exists"):
        model_io.save_model(loaded, orbax_dir)


def test_hub_config_parses_to_the_7b_preset_and_agrees_with_transformers():
    ours = config_from_hf(LLAVA_1_5_7B_HUB_CONFIG)
    assert ours == presets.llava_1_5_7b(dtype="float32", param_dtype="float32")
    theirs = HFLlavaConfig(**LLAVA_1_5_7B_HUB_CONFIG)
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "vocab_size", "head_dim"):
        assert getattr(ours.text_config, name) == getattr(theirs.text_config, name), name
    assert ours.text_config.rope_theta == theirs.text_config.rope_parameters["rope_theta"]
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "image_size", "patch_size",
                 "hidden_act", "layer_norm_eps"):
        assert getattr(ours.vision_config, name) == getattr(theirs.vision_config, name), name
    assert ours.image_token_id == theirs.image_token_id


def test_config_round_trips_through_transformers():
    config = presets.llava_1_5_13b(dtype="float32", param_dtype="float32")
    config = dataclasses.replace(config, vision_feature_layer=(-2, -5), vision_feature_select_strategy="full")
    through_transformers = HFLlavaConfig(**config_to_hf(config)).to_dict()
    assert config_from_hf(through_transformers) == config


def test_unsupported_configs_are_refused():
    with pytest.raises(ValueError, match="stem='conv', token_merge=2 have no transformers equivalent"):
        config_to_hf(presets.tiny(vocab_size=64, image_token_id=63))
    linear_rope = dict(LLAVA_1_5_7B_HUB_CONFIG, text_config={"rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ValueError, match="rope_type='linear' is not supported"):
        config_from_hf(linear_rope)
    with pytest.raises(ValueError, match="text_config.model_type='mistral'"):
        config_from_hf(dict(LLAVA_1_5_7B_HUB_CONFIG, text_config={"model_type": "mistral"}))
