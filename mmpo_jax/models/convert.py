"""transformers checkpoints (config.json + safetensors) <-> our NNX models, without torch.

Our parameter paths are transformers' module names with NNX leaf names (`kernel`, `scale`,
`embedding`), so a tensor's name is computed from the path, never from a hand-written table:
`language_model.model.layers.0.self_attn.q_proj.kernel` <-> `...q_proj.weight` (transposed).
Linear kernels are `[in, out]` here and `[out, in]` in torch; conv kernels HWIO here, OIHW there.

LLaVA tensors are read under any of the layouts in circulation and normalised to the llava-hf hub
layout, which is also what `save_hf_llava` writes (transformers 4.x and 5.x both load it):

    hub (llava-hf/*, 4.x)                transformers 5 modules             saved by 5.x
    language_model.model.X               model.language_model.X             language_model.model.X
    language_model.lm_head.weight        lm_head.weight                     language_model.lm_head.weight
    vision_tower.vision_model.X          model.vision_tower.X               vision_tower.X
    multi_modal_projector.X              model.multi_modal_projector.X      multi_modal_projector.X

Configs are parsed without transformers (importing its config classes imports torch); absent
fields take transformers 5's defaults, listed below.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import load_file, save_file

from mmpo_jax.models.clip import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
from mmpo_jax.models.llama import LlamaConfig
from mmpo_jax.models.llava import Llava, LlavaConfig

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Buffers that old checkpoints carry and that are not parameters (recomputed by every model).
IGNORED_SUFFIXES = (".position_ids", ".rotary_emb.inv_freq")
# safetensors dtype codes of the float and integer tensors checkpoints hold.
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
# NNX leaf name -> the torch parameter name it comes from.
LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}

# transformers 5.23 defaults for the fields a config.json may leave out.
LLAMA_DEFAULTS = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=None, head_dim=None, hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
    tie_word_embeddings=False, attention_bias=False, mlp_bias=False, rope_theta=10000.0,
)
CLIP_VISION_DEFAULTS = dict(
    hidden_size=768, intermediate_size=3072, projection_dim=512, num_hidden_layers=12, num_attention_heads=12,
    num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
CLIP_TEXT_DEFAULTS = dict(
    vocab_size=49408, hidden_size=512, intermediate_size=2048, projection_dim=512, num_hidden_layers=12,
    num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    eos_token_id=49407,
)
# LlavaConfig's vision tower when config.json has no vision_config: CLIP ViT-L/14-336.
LLAVA_VISION_DEFAULTS = dict(
    intermediate_size=4096, hidden_size=1024, patch_size=14, image_size=336, num_hidden_layers=24,
    num_attention_heads=16, projection_dim=768,
)


# --------------------------------------------------------------------------------------------
# Configs


def _fields(hf: dict, defaults: dict) -> dict:
    return {name: default if hf.get(name) is None else hf[name] for name, default in defaults.items()}


def _rope_theta(hf: dict) -> float:
    """rope_theta from v5's `rope_parameters` or the legacy top-level field; only plain RoPE."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope_type={rope_type!r} is not supported; only 'default' (plain RoPE) is")
    return float(rope.get("rope_theta", hf.get("rope_theta", LLAMA_DEFAULTS["rope_theta"])))


def llama_config_from_hf(hf: dict, *, dtype: str = "float32", param_dtype: str = "float32") -> LlamaConfig:
    """A transformers `LlamaConfig` dict -> our LlamaConfig (absent fields: transformers' defaults)."""
    fields = _fields(hf, LLAMA_DEFAULTS)
    fields["rope_theta"] = _rope_theta(hf)
    if fields["num_key_value_heads"] is None:
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    if hf.get("pretraining_tp", 1) not in (1, None):
        raise ValueError(f"pretraining_tp={hf['pretraining_tp']} is not supported; only 1")
    return LlamaConfig(**fields, dtype=dtype, param_dtype=param_dtype)


def clip_vision_config_from_hf(
    hf: dict, *, defaults: dict = CLIP_VISION_DEFAULTS, dtype: str = "float32", param_dtype: str = "float32"
) -> CLIPVisionConfig:
    """A transformers `CLIPVisionConfig` dict -> our CLIPVisionConfig (patch stem, no merge)."""
    return CLIPVisionConfig(**_fields(hf, {**CLIP_VISION_DEFAULTS, **defaults}), dtype=dtype, param_dtype=param_dtype)


def config_from_hf(hf: dict, *, dtype: str = "float32", param_dtype: str = "float32") -> LlavaConfig:
    """A transformers `LlavaConfig` dict (config.json) -> LlavaConfig, with the compute/storage dtypes."""
    if hf.get("model_type", "llava") != "llava":
        raise ValueError(f"model_type={hf['model_type']!r}; expected 'llava'")
    text_hf = hf.get("text_config") or {}
    vision_hf = hf.get("vision_config")
    if text_hf.get("model_type", "llama") != "llama":
        raise ValueError(f"text_config.model_type={text_hf['model_type']!r}; only 'llama' decoders are supported")
    if vision_hf is not None and vision_hf.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"vision_config.model_type={vision_hf['model_type']!r}; expected 'clip_vision_model'")
    text_hf = dict(text_hf)
    if hf.get("tie_word_embeddings"):  # transformers forwards the top-level flag to the decoder
        text_hf["tie_word_embeddings"] = True
    layer = hf.get("vision_feature_layer", -2)
    image_token_id = hf.get("image_token_index", hf.get("image_token_id", 32000))
    return LlavaConfig(
        vision_config=clip_vision_config_from_hf(
            vision_hf or {}, defaults={} if vision_hf else LLAVA_VISION_DEFAULTS, dtype=dtype, param_dtype=param_dtype
        ),
        text_config=llama_config_from_hf(text_hf, dtype=dtype, param_dtype=param_dtype),
        image_token_id=image_token_id,
        vision_feature_layer=layer if isinstance(layer, int) else tuple(layer),
        vision_feature_select_strategy=hf.get("vision_feature_select_strategy", "default"),
        projector_hidden_act=hf.get("projector_hidden_act", "gelu"),
        multimodal_projector_bias=hf.get("multimodal_projector_bias", True),
        pad_token_id=hf.get("pad_token_id", text_hf.get("pad_token_id")),
        eos_token_id=hf.get("eos_token_id", text_hf.get("eos_token_id", 2)),
    )


def config_to_hf(config: LlavaConfig, *, bos_token_id: int | None = None) -> dict:
    """LlavaConfig -> a transformers `LlavaConfig` dict for config.json (float32 weights).

    `bos_token_id` (the tokenizer's; our config does not hold it) goes to `text_config`, where
    llava-hf checkpoints and `generate` read it; None leaves transformers' default (1).
    """
    vision, text = config.vision_config, config.text_config
    if vision.stem != "patch" or vision.token_merge != 1:
        raise ValueError(
            f"stem={vision.stem!r}, token_merge={vision.token_merge} have no transformers equivalent; "
            "only stem='patch' with token_merge=1 can be exported"
        )
    text_hf = {name: getattr(text, name) for name in LLAMA_DEFAULTS if name != "rope_theta"}
    text_hf.update(
        model_type="llama", rope_parameters={"rope_type": "default", "rope_theta": text.rope_theta},
        pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id,
    )
    if bos_token_id is not None:
        text_hf["bos_token_id"] = bos_token_id
    vision_hf = {name: getattr(vision, name) for name in CLIP_VISION_DEFAULTS}
    vision_hf["model_type"] = "clip_vision_model"
    layer = config.vision_feature_layer
    return dict(
        architectures=["LlavaForConditionalGeneration"], model_type="llava", dtype="float32",
        text_config=text_hf, vision_config=vision_hf, image_token_index=config.image_token_id,
        vision_feature_layer=layer if isinstance(layer, int) else list(layer),
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        projector_hidden_act=config.projector_hidden_act,
        multimodal_projector_bias=config.multimodal_projector_bias,
        tie_word_embeddings=text.tie_word_embeddings, pad_token_id=config.pad_token_id,
    )


def clip_config_from_hf(hf: dict, *, dtype: str = "float32", param_dtype: str = "float32") -> CLIPConfig:
    """A transformers `CLIPConfig` dict -> CLIPConfig."""
    if hf.get("model_type", "clip") != "clip":
        raise ValueError(f"model_type={hf['model_type']!r}; expected 'clip'")
    return CLIPConfig(
        vision_config=clip_vision_config_from_hf(hf.get("vision_config") or {}, dtype=dtype, param_dtype=param_dtype),
        text_config=CLIPTextConfig(
            **_fields(hf.get("text_config") or {}, CLIP_TEXT_DEFAULTS), dtype=dtype, param_dtype=param_dtype
        ),
        projection_dim=hf.get("projection_dim", 512),
        logit_scale_init_value=hf.get("logit_scale_init_value", 2.6592),
    )


# --------------------------------------------------------------------------------------------
# Safetensors files


def read_safetensors(directory: str | pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory: `model.safetensors`, or the shards its index lists."""
    directory = pathlib.Path(directory)
    index = directory / SAFETENSORS_INDEX
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / SAFETENSORS_FILE).exists():
        files = [SAFETENSORS_FILE]
    else:
        raise FileNotFoundError(f"{directory} holds neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}")
    tensors: dict[str, np.ndarray] = {}
    for file_name in files:
        tensors.update(_load_file(directory / file_name))
    return tensors


def _load_file(path: pathlib.Path) -> dict[str, np.ndarray]:
    """`safetensors.numpy.load_file`, plus bfloat16 (numpy lacks it; read as ml_dtypes.bfloat16).

    The fallback parses the format directly: an 8-byte little-endian header length, a JSON header
    of {name: {dtype, shape, data_offsets}}, then the raw little-endian data.
    """
    with open(path, "rb") as file:
        header_size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(header_size))
    if all(entry.get("dtype") != "BF16" for name, entry in header.items() if name != "__metadata__"):
        return load_file(path)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_size)
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        tensors[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(entry["shape"])
    return tensors


def write_safetensors(
    tensors: dict[str, np.ndarray], directory: str | pathlib.Path, *, max_shard_bytes: int = 5 * 2**30
) -> None:
    """Writes `model.safetensors`, or shards of at most `max_shard_bytes` plus their index (as transformers)."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    for name in sorted(tensors):
        shard_bytes = sum(array.nbytes for array in shards[-1].values())
        if shards[-1] and shard_bytes + tensors[name].nbytes > max_shard_bytes:
            shards.append({})
        shards[-1][name] = np.ascontiguousarray(tensors[name])
    if len(shards) == 1:
        save_file(shards[0], directory / SAFETENSORS_FILE, metadata={"format": "pt"})
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    total = sum(array.nbytes for array in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))


# --------------------------------------------------------------------------------------------
# Parameters


def _torch_name(path: tuple) -> str:
    """NNX parameter path -> transformers parameter name (the last component renamed)."""
    *modules, leaf = (str(part) for part in path)
    return ".".join([*modules, LEAF_TO_TORCH.get(leaf, leaf)])


def _to_nnx(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 2:
        return array.T  # torch Linear [out, in] -> [in, out]
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)  # torch Conv2d OIHW -> HWIO
    return array


def _to_torch(array: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and array.ndim == 2:
        return array.T
    if leaf == "kernel" and array.ndim == 4:
        return array.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    return array


def _describe(names: list[str], limit: int = 40) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_params(
    build: Callable[[], nnx.Module],
    tensors: dict[str, np.ndarray],
    name_of: Callable[[tuple], str],
    *,
    optional: frozenset[str] = frozenset(),
) -> nnx.Module:
    """Builds the model `build` describes with its parameters taken from `tensors`.

    name_of maps each NNX parameter path to the tensor name it is read from. Every parameter must
    be found and every tensor used (names in `optional` and non-parameter buffers may be left
    over); otherwise a `ValueError` lists the missing and unexpected names. Shapes are checked.
    """
    abstract = nnx.eval_shape(build)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"the model holds non-parameter state {list(nnx.to_flat_state(rest))}, which cannot be loaded")
    flat = list(nnx.to_flat_state(params))
    expected = {name_of(path): (path, variable) for path, variable in flat}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(
        name for name in set(tensors) - set(expected) if name not in optional and not name.endswith(IGNORED_SUFFIXES)
    )
    if missing or unexpected:
        raise ValueError(
            f"checkpoint does not match the model: missing tensors [{_describe(missing)}]; "
            f"unexpected tensors [{_describe(unexpected)}]"
        )
    loaded, mismatched = [], []
    for name, (path, variable) in expected.items():
        array = _to_nnx(tensors[name], str(path[-1]))
        if array.shape != variable.shape:
            mismatched.append(
                f"tensor {name} has shape {tensors[name].shape}, which gives {array.shape} here; "
                f"the config expects {variable.shape}"
            )
        else:
            loaded.append((path, variable.replace(jnp.asarray(array, dtype=variable.dtype))))
    if mismatched:
        raise ValueError("checkpoint shapes do not match the config: " + "; ".join(mismatched))
    return nnx.merge(graphdef, nnx.from_flat_state(loaded), rest)


def export_params(model: nnx.Module, name_of: Callable[[tuple], str]) -> dict[str, np.ndarray]:
    """Every parameter of `model` as a float32 torch-layout numpy array, by the name `name_of` gives."""
    tensors = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        array = np.asarray(jnp.asarray(variable[...], jnp.float32))
        tensors[name_of(path)] = np.ascontiguousarray(_to_torch(array, str(path[-1])))
    return tensors


# LLaVA layouts -> the hub layout (first matching prefix wins).
_LLAVA_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def hub_llava_name(name: str) -> str:
    """Any LLaVA checkpoint tensor name -> its llava-hf hub name (see the module docstring)."""
    for prefix, replacement in _LLAVA_PREFIXES:
        if name.startswith(prefix):
            name = replacement + name.removeprefix(prefix)
            break
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        name = "vision_tower.vision_model." + name.removeprefix("vision_tower.")
    return name


def llava_tensor_name(path: tuple) -> str:
    """Llava parameter path -> its tensor name in the llava-hf hub layout (what `save_hf_llava` writes)."""
    name = _torch_name(path)
    if name.startswith("vision_tower."):
        return "vision_tower.vision_model." + name.removeprefix("vision_tower.")
    return name


def load_hf_llava(
    path: str | pathlib.Path, *, dtype: str = "float32", param_dtype: str = "float32"
) -> tuple[Llava, LlavaConfig]:
    """A transformers `LlavaForConditionalGeneration` directory -> (Llava, LlavaConfig).

    Reads config.json and the safetensors (single or sharded, any layout of the module docstring)
    with numpy. Raises `ValueError` listing missing/unexpected tensors or naming a shape mismatch.
    """
    path = pathlib.Path(path)
    config = config_from_hf(json.loads((path / "config.json").read_text()), dtype=dtype, param_dtype=param_dtype)
    tensors = {hub_llava_name(name): array for name, array in read_safetensors(path).items()}
    # A tied decoder has no lm_head; checkpoints may still carry the (identical) copy.
    optional = frozenset({"language_model.lm_head.weight"}) if config.text_config.tie_word_embeddings else frozenset()
    model = load_params(lambda: Llava(config, rngs=nnx.Rngs(0)), tensors, llava_tensor_name, optional=optional)
    return model, config


def save_hf_llava(
    model: Llava, config: LlavaConfig, path: str | pathlib.Path, *, max_shard_bytes: int = 5 * 2**30,
    bos_token_id: int | None = None,
) -> None:
    """Writes config.json + float32 safetensors (hub layout) that transformers' `from_pretrained` loads.

    The weights alone; `mmpo_jax.engine.hf_export.export_pretrained` adds the tokenizer, processor,
    chat template and generation config.
    """
    path = pathlib.Path(path)
    hf_config = config_to_hf(config, bos_token_id=bos_token_id)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    write_safetensors(export_params(model, llava_tensor_name), path, max_shard_bytes=max_shard_bytes)


def load_hf_clip(
    path: str | pathlib.Path, *, dtype: str = "float32", param_dtype: str = "float32"
) -> tuple[CLIPModel, CLIPConfig]:
    """A transformers `CLIPModel` directory -> (CLIPModel, CLIPConfig); errors as `load_hf_llava`."""
    path = pathlib.Path(path)
    config = clip_config_from_hf(json.loads((path / "config.json").read_text()), dtype=dtype, param_dtype=param_dtype)
    model = load_params(lambda: CLIPModel(config, rngs=nnx.Rngs(0)), read_safetensors(path), _torch_name)
    return model, config
