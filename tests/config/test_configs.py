"""configs/*.py, `config.schema`, `config.loading` (files, overrides) and `config.checks.validate`."""

import json
import os
import re
import subprocess
import sys
import math
import pathlib

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from mmpo_jax.config import loading as config_loading
from mmpo_jax.config import schema
from mmpo_jax.config.checks import ConfigError, epoch_steps, samples_rollouts, validate
from mmpo_jax.config.loading import load_config
from mmpo_jax.data.builders.shapes_world import SPLIT_FIELDS
from mmpo_jax.data.fields import ROLLOUTS
from mmpo_jax.data.row_encoding import EXTRAS
from mmpo_jax.engine.scoring import plan_scoring
from mmpo_jax.objectives import registry
from mmpo_jax.training import experiment

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"
METHOD_FILES = sorted(registry.methods())
LLAVA_FILES = ("llava_1_5_7b_tpu.py", "llava_1_5_7b_gpu.py")
PREFERENCE_FEATURES = SPLIT_FIELDS["preference"]


@pytest.fixture(autouse=True)
def elsewhere(tmp_path, monkeypatch):
    """Every test runs from a directory that is neither the repository nor configs/."""
    monkeypatch.chdir(tmp_path)


def _load(name: str, *overrides: str) -> ml_collections.ConfigDict:
    return load_config(str(CONFIGS / name), overrides)


def required_extras(method) -> tuple[str, ...]:
    return (ROLLOUTS,) if samples_rollouts(method) else plan_scoring(method).pipeline_extras


def required_record_fields(method) -> tuple[str, ...]:
    return ("image", "prompt") if samples_rollouts(method) else plan_scoring(method).record_fields


def _problems(config, **kwargs) -> str:
    with pytest.raises(ValueError) as error:
        validate(config, **kwargs)
    return str(error.value)


def test_every_method_has_a_config_file():
    assert {path.stem for path in CONFIGS.glob("*.py")} == {
        "base", "shapes_world_v2", *METHOD_FILES, *(name.removesuffix(".py") for name in LLAVA_FILES)}


@pytest.mark.parametrize("method", METHOD_FILES)
def test_v2_file_moves_every_method_to_the_v2_world(method):
    config = _load(f"shapes_world_v2.py:{method}")
    tiny = _load(f"{method}.py")
    two_images = {"combine_mode": "two_images"} if method == "p2dpo" else {}  # the paper's I_aug on v2
    assert config.method.to_dict() == {**tiny.method.to_dict(), **two_images}
    # P2-DPO trains on its generated pairs; the v2 world is its prompt source (pairs.source_builder)
    world = experiment.world_config(config)
    assert (world.data.builder.to_dict(), config.model.preset) == ({"world": "v2"}, "tiny_v2")
    if world is not config:
        assert config.data.builder.to_dict() == {}  # p2dpo_pairs takes no builder options
        assert config.data.manual_dir != tiny.data.manual_dir  # never v1's pairs
    validate(config, device_count=1)


def _longest_caption(spec):
    """5 objects, each an unpaired partner trigger of its own colour, plus the 3 partners the bias
    appends: 8 groups, every word one token of the world's word-level tokenizer."""
    from mmpo_jax.data import shapes_world as sw

    triggers = [t for t, _ in spec.partners]
    objects = [(color, triggers[i % len(triggers)]) for i, color in enumerate(spec.colors[:spec.max_objects])]
    mentions = objects + [(color, spec.partner_map[shape]) for color, shape in objects[:len(triggers)]]
    assert len(sw.caption_groups(mentions)) == spec.max_objects + len(spec.partners)
    return sw.caption_text(sw.caption_groups(mentions), spec.count_words)


def test_v2_buckets_hold_the_longest_caption_the_v2_grammar_writes():
    from mmpo_jax.data import shapes_world as sw
    from mmpo_jax.data import shapes_world_v2 as w2
    from mmpo_jax.data.template import encode_prompt_response
    from mmpo_jax.data.tokenizer import build_word_tokenizer
    from mmpo_jax.models import presets

    spec = w2.WorldSpecV2()
    tokenizer = build_word_tokenizer(w2.vocabulary(spec), model_max_length=512)
    caption = _longest_caption(spec)
    tokens = presets.tiny_v2(vocab_size=len(tokenizer), image_token_id=0).num_image_tokens
    longest = max(len(encode_prompt_response(tokenizer, prompt, caption, num_image_tokens=tokens,
                                             max_length=10_000).input_ids)
                  for prompt in (sw.CAPTION_PROMPT, w2.COUNT_TEMPLATE.format(plural="diamonds")))
    buckets = _load("shapes_world_v2.py").data.buckets
    assert max(_load("catpo.py").data.buckets) < longest <= max(buckets)


def test_v2_p2dpo_trains_the_papers_two_image_prompt_on_the_base_every_v2_method_shares():
    from mmpo_jax.data import shapes_world as sw
    from mmpo_jax.data import shapes_world_v2 as w2
    from mmpo_jax.data.template import encode_prompt_response
    from mmpo_jax.data.tokenizer import build_word_tokenizer
    from mmpo_jax.models import presets

    p2dpo, catpo = _load("shapes_world_v2.py:p2dpo"), _load("shapes_world_v2.py:catpo")
    assert p2dpo.pairs.combine_mode == p2dpo.method.combine_mode == "two_images"
    assert p2dpo.pairs.enhanced_prompt.startswith("answer mainly from the first image")
    assert (experiment.sft_base_identity(experiment.world_config(p2dpo))
            == experiment.sft_base_identity(catpo))  # one cached base, whatever the buckets
    base = experiment.sft_base_config(catpo)
    assert base.data.buckets == (96, 112, 192) and base.sft_base.focus_split == "sft_focus"
    spec = w2.WorldSpecV2()
    tokenizer = build_word_tokenizer(w2.vocabulary(spec), model_max_length=512)
    tokens = presets.tiny_v2(vocab_size=len(tokenizer), image_token_id=0).num_image_tokens
    prompt = p2dpo.pairs.enhanced_prompt.format(prompt=w2.COUNT_TEMPLATE.format(plural="diamonds"))
    encoded = encode_prompt_response(tokenizer, prompt, "three blue diamonds .", num_image_tokens=tokens,
                                     num_images=2, max_length=10_000)
    assert tokenizer.unk_token_id not in encoded.input_ids  # every instruction word is the world's
    assert max(catpo.data.buckets) < len(encoded.input_ids) <= max(p2dpo.data.buckets) - 32
    # the base's two-image SFT records: the longest caption the grammar writes fits its buckets
    longest = encode_prompt_response(tokenizer, w2.FOCUS_PROMPT.format(prompt=sw.CAPTION_PROMPT),
                                     _longest_caption(spec), num_image_tokens=tokens, num_images=2,
                                     max_length=10_000)
    assert max(catpo.data.buckets) < len(longest.input_ids) <= max(base.data.buckets)
    with pytest.raises(ValueError, match=r"sft_base.buckets=\(112, 96\) must be positive and strictly"):
        validate(_load("shapes_world_v2.py:catpo", "sft_base.buckets=(112,96)"), device_count=1)


@pytest.mark.parametrize("name", [f"{method}.py" for method in METHOD_FILES])
def test_method_config_loads_validates_and_round_trips(name):
    config = _load(name)
    assert config.name == config.method.name == name.removesuffix(".py")
    for device_count in (1, 8):
        validate(config, device_count=device_count)
    from_json = json.loads(config.to_json())
    validate(from_json, device_count=8)
    validate(ml_collections.ConfigDict(from_json), device_count=8)
    assert from_json == json.loads(json.dumps(config.to_dict()))
    assert config.train.num_steps == 200 and config.data.batch_size == 32
    assert config.sft_base.num_steps == 1300 and config.sft_base.learning_rate == 1e-3
    assert "learning_rate" in config.reference_settings


@pytest.mark.parametrize("method", METHOD_FILES)
@pytest.mark.parametrize("name", LLAVA_FILES)
def test_llava_presets_build_every_method(name, method):
    config = _load(f"{name}:{method}")
    tiny = _load(f"{method}.py")
    assert config.method == tiny.method
    model = config.model
    assert (model.preset, model.init, model.dtype, model.param_dtype) == (
        "llava_1_5_7b", "checkpoint", "bfloat16", "float32")
    assert config.model.remat and config.model.lora.enabled
    assert config.reference.mode == "lora_base"
    assert config.data.dataset == ("p2dpo_pairs" if method == "p2dpo" else "rlhf_v")
    assert config.data.buckets == (1024, 2048)
    settings = tiny.reference_settings
    assert config.optimizer.learning_rate == settings.learning_rate
    # the paper's epochs over whatever the prepared split holds: 5,733 pairs for RLHF-V
    assert (config.train.num_steps, config.data.num_epochs) == (0, settings.get("num_epochs", 1))
    epochs = settings.get("num_epochs", 1)
    assert epoch_steps(config, 5733) == (  # batches never straddle epochs; rollouts stream
        math.ceil(epochs * 5733 / (32 // config.rollout.num_samples)) if method == "fisao"
        else epochs * math.ceil(5733 / 32))
    assert config.data.split == "train"
    if method == "fisao":  # its verifier and calibration exist for the shapes world only
        assert "method 'fisao' on data.dataset='rlhf_v'" in _problems(config, device_count=1)
        return
    validate(config, device_count=1)
    if name.endswith("tpu.py"):
        validate(config, device_count=8)
        validate(config, device_count=4)  # a v4-8 slice has 4 chips
    else:  # one GPU by default: 8 GPUs need ``:<method>,8``, whose accumulation is named
        assert "valid optimizer.grad_accum_steps" in _problems(config, device_count=8)


def test_llava_catpo_takes_the_papers_settings():
    config = _load("llava_1_5_7b_tpu.py")  # default method: catpo
    assert config.method.name == "catpo"
    assert (config.model.lora.rank, config.model.lora.alpha) == (128, 256.0)
    assert (config.optimizer.learning_rate, config.optimizer.warmup_ratio) == (1.4e-6, 0.03)
    assert dict(config.mesh) == {"data": 1, "fsdp": -1, "tensor": 1}
    mdpo = _load("llava_1_5_7b_gpu.py:mdpo")
    assert (mdpo.model.lora.rank, mdpo.optimizer.b2, mdpo.data.num_epochs) == (64, 0.98, 3)
    assert epoch_steps(mdpo, 5733) == 540  # 3 x ceil(5733 / 32): each epoch's last batch padded


@pytest.mark.parametrize("chips", [4, 8, 16, 32])
def test_tpu_preset_is_valid_on_every_documented_slice(chips):
    """v4-8 (4 chips), v5e-8 (8), v4-32 (16), v4-64 / v5e-32 (32): ``:catpo,<chips>`` is valid at
    one or two rows per chip per micro-batch; the default (``:catpo``) is 4 and 8 chips'."""
    config = _load(f"llava_1_5_7b_tpu.py:catpo,{chips}")
    validate(config, device_count=chips)
    accum = config.optimizer.grad_accum_steps
    assert config.data.batch_size % accum == 0
    assert config.data.batch_size // accum // chips in (1, 2)
    if chips <= 8:
        assert _load("llava_1_5_7b_tpu.py:catpo").to_dict() == config.to_dict()
    else:  # the default on a larger slice: the valid accumulation is named
        message = _problems(_load("llava_1_5_7b_tpu.py:catpo"), device_count=chips)
        valid = "1, 2" if chips == 16 else "1"
        assert message.endswith(f"valid optimizer.grad_accum_steps for data.batch_size=32 on "
                                f"this mesh: {valid}"), message


@pytest.mark.parametrize("gpus", [1, 2, 4, 8, 16])
def test_gpu_preset_is_valid_on_one_or_several_gpus(gpus):
    """``:catpo,<gpus>``: FSDP over the GPUs, micro-batches of 2 rows per GPU (one host or a
    SLURM job of several)."""
    config = _load(f"llava_1_5_7b_gpu.py:catpo,{gpus}")
    validate(config, device_count=gpus)
    assert config.data.batch_size // config.optimizer.grad_accum_steps == 2 * gpus
    if gpus == 1:
        assert _load("llava_1_5_7b_gpu.py:catpo").to_dict() == config.to_dict()


def test_platform_presets_reject_a_device_count_the_batch_cannot_spread_over():
    with pytest.raises(ConfigError, match=r"12 devices: the batch of 32 spreads evenly over "
                                          r"\[1, 2, 4, 8, 16, 32\] devices only"):
        _load("llava_1_5_7b_tpu.py:catpo,12")
    with pytest.raises(ConfigError, match=r"32 devices: .* over \[1, 2, 4, 8, 16\] devices only"):
        _load("llava_1_5_7b_gpu.py:catpo,32")
    with pytest.raises(ConfigError, match="expected '<method>,<devices>'"):
        _load("llava_1_5_7b_tpu.py:catpo,v4")


def test_unknown_llava_method_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown method 'bogus'.*'catpo'"):
        _load("llava_1_5_7b_tpu.py:bogus")


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # in config_flags
@pytest.mark.parametrize("name", ["catpo.py", "llava_1_5_7b_tpu.py"])
def test_the_cli_flag_loads_configs_from_another_cwd(name):
    """What the train CLI does: absl's DEFINE_config_file with overrides."""
    argv = ["train", f"--config={CONFIGS / name}:mdpo", "--config.method.beta=0.3",
            "--config.data.buckets=(32, 64)"]
    flag_values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    assert holder.value.method.beta == 0.3 and holder.value.data.buckets == (32, 64)
    validate(holder.value, device_count=8)


def test_overrides_take_the_fields_types():
    config = _load("catpo.py", "method.beta=0.2", "mesh.fsdp=2", "train.num_steps=5",
                   "data.buckets=(32,64)", "data.shuffle=false", "method.terms.token_kl=0",
                   "data.builder={'p': 0.3}", "method.token_weights=none")
    assert config.method.beta == 0.2 and isinstance(config.method.beta, float)
    assert (config.mesh.fsdp, config.train.num_steps, config.data.buckets) == (2, 5, (32, 64))
    assert config.data.shuffle is False and config.method.terms.token_kl == 0.0
    assert config.data.builder.to_dict() == {"p": 0.3} and config.method.token_weights == "none"
    validate(config, device_count=8)
    terms = _load("dpo.py", "method.terms={'dpo': 1.0, 'nll': 0.1}").method.terms
    assert terms.to_dict() == {"dpo": 1.0, "nll": 0.1}


@pytest.mark.parametrize("override, message", [
    ("method.betaa=0.2", "'method.betaa'.*valid fields of method: .*'beta'"),
    ("nosection.x=1", "the config has no field 'nosection'"),
    ("method.terms.nll=0.1", "method.terms.*replaced whole"),
    ("method.beta.x=1", "method.beta is a float, not a section"),
    ("method.beta", "not of the form"),
    ("method.beta=abc", "could not convert"),
    ("train.num_steps=2.5", "num_steps"),
])
def test_bad_overrides_raise_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        _load("catpo.py", override)


def test_configs_are_locked():
    config = _load("dpo.py")
    with pytest.raises(AttributeError):
        config.method.betaa = 0.2
    with pytest.raises(ConfigError,
                       match=r"nope.py: no such config file .*; the configs in .*adapt"):
        _load("nope.py")


@pytest.mark.parametrize("mesh, message", [
    ({"data": 3, "fsdp": 1}, "3 slots but there are 8 devices"),
    ({"data": -1, "fsdp": 3}, "not divisible by the fixed axes' product 3"),
    ({"data": -1, "fsdp": -1}, "at most one -1"),
    ({"data": 0, "fsdp": 1}, "must be positive"),
])
def test_impossible_meshes_raise(mesh, message):
    config = _load("dpo.py", *(f"mesh.{axis}={size}" for axis, size in mesh.items()))
    assert message in _problems(config, device_count=8)


def test_batch_splits():
    assert "not divisible by optimizer.grad_accum_steps=4" in _problems(
        _load("dpo.py", "data.batch_size=30", "optimizer.grad_accum_steps=4"), device_count=1)
    micro = _load("dpo.py", "optimizer.grad_accum_steps=8")  # micro-batch 4 over 8 devices
    validate(micro, device_count=4)
    assert "micro-batch" in _problems(micro, device_count=8)
    batch = micro.data.batch_size
    assert _problems(micro, device_count=8).endswith(  # the accumulations that would fit
        f"valid optimizer.grad_accum_steps for data.batch_size={batch} on this mesh: "
        + ", ".join(str(a) for a in range(1, batch + 1) if batch % a == 0 and batch // a % 8 == 0))
    assert _problems(_load("dpo.py", "data.batch_size=12"), device_count=8).endswith(
        "data.batch_size=12 must be a multiple of 8")
    sft = _load("dpo.py", "sft_base.batch_size=12")
    assert "sft_base.batch_size = 12" in _problems(sft, device_count=8)
    validate(_load("dpo.py", "sft_base.batch_size=12", "model.init=random"), device_count=8)
    # The batch axes come from mesh_rules: replicated batches need no divisibility.
    validate(_load("dpo.py", "data.batch_size=3", "mesh_rules=(('batch', None),)"), device_count=8)


def test_reference_modes():
    lora_base = _load("mdpo.py", "reference.mode=lora_base")
    assert "needs model.lora.enabled=true" in _problems(lora_base)
    projector = _problems(_load("mdpo.py", "reference.mode=lora_base", "model.lora.enabled=true"))
    assert "set model.train_projector=false" in projector
    validate(_load("mdpo.py", "reference.mode=lora_base", "model.lora.enabled=true",
                   "model.train_projector=false"))
    assert "on-policy" in _problems(_load("fisao.py", "reference.mode=cache"))
    catpo = _problems(_load("catpo.py", "reference.mode=cache"))
    assert "cannot serve the token_kl term" in catpo and "whole next-token distribution" in catpo
    # Cat-PO's token weights come from the reference once per record: the cache holds them.
    validate(_load("catpo.py", "reference.mode=cache", "method.terms.token_kl=0"))
    assert "['corrupted']" in _problems(_load("mdpo.py", "reference.mode=cache"))
    assert "['noised']" in _problems(_load("tpo.py", "reference.mode=cache"))
    assert "enhanced image" in _problems(_load("adapt.py", "reference.mode=cache"))
    validate(_load("dpo.py", "reference.mode=cache"))


def test_dataset_features():
    p2dpo = _load("p2dpo.py")
    message = _problems(p2dpo, dataset_features=PREFERENCE_FEATURES)
    assert "'p2dpo'" in message and "robust_chosen" in message and "'p2dpo_pairs'" in message
    p2dpo_fields = required_record_fields(p2dpo.method)
    validate(p2dpo, dataset_features=p2dpo_fields)
    for method in ("dpo", "mdpo", "catpo", "tpo", "adapt", "sft"):
        validate(_load(f"{method}.py"), dataset_features=PREFERENCE_FEATURES)
    validate(_load("fisao.py"), dataset_features=PREFERENCE_FEATURES)  # rollouts: image + prompt
    assert "lacks ['prompt']" in _problems(_load("fisao.py"), dataset_features=("id", "image"))
    ddw = _load("p2dpo.py", "method.ddw=true")
    assert "ddw_clip_crop" in _problems(ddw, dataset_features=p2dpo_fields)


def test_p2dpo_branch_ablations_read_only_their_pair():
    without_feps = _load("p2dpo.py", "method.branches=('robust',)").method
    assert required_extras(without_feps) == ("robust_pair",)
    assert required_record_fields(without_feps) == ("image", "noise_key", "prompt",
                                                    "robust_chosen", "robust_rejected")
    without_vrps = _load("p2dpo.py", "method.branches=('focus',)").method
    assert required_extras(without_vrps) == ("focus_images",)
    assert "robust_chosen" not in required_record_fields(without_vrps)
    assert "non-empty subset" in _problems(_load("p2dpo.py", "method.branches=('vrp',)"))
    assert "splits weight" in _problems(_load("p2dpo.py", "method.branches=('robust',)",
                                              "method.ddw=true"))


EXPECTED_EXTRAS = {
    "sft": (), "dpo": (), "catpo": (), "mdpo": ("corrupt_pixel_values",),
    "tpo": ("noise_pixel_values",), "adapt": ("noise_pixel_values",),
    "p2dpo": ("focus_images", "robust_pair"), "fisao": (ROLLOUTS,),
}


_PAIR = ("chosen", "image", "prompt", "rejected")
EXPECTED_FIELDS = {
    "sft": ("chosen", "image", "prompt"), "dpo": _PAIR, "catpo": _PAIR, "mdpo": _PAIR,
    "tpo": _PAIR, "adapt": _PAIR, "fisao": ("image", "prompt"),
    "p2dpo": ("chosen", "focus_aug_image", "focus_deg_image", "image", "noise_key", "prompt",
              "rejected", "robust_chosen", "robust_rejected"),
}


@pytest.mark.parametrize("method", METHOD_FILES)
def test_extras_follow_the_registrys_scores(method):
    block = _load(f"{method}.py").method
    extras = required_extras(block)
    assert extras == EXPECTED_EXTRAS[method]
    assert set(extras) <= {*EXTRAS, ROLLOUTS}
    assert required_record_fields(block) == EXPECTED_FIELDS[method]


def test_extras_follow_the_options():
    p2dpo = dict(_load("p2dpo.py").method.to_dict())
    assert required_extras({**p2dpo, "ddw": True}) == ("ddw_clip", "focus_images", "robust_pair")
    assert required_extras({**p2dpo, "lambda_calib": 0.0}) == ("robust_pair",)
    catpo = _load("catpo.py").method.to_dict()
    assert required_extras({**catpo, "token_weights": "tpo"}) == ("noise_pixel_values",)
    mixed = {**catpo, "terms": {"dpo": 1.0, "copo": 1.0}}
    assert required_extras(mixed) == ("corrupt_pixel_values",)


@pytest.mark.parametrize("method", METHOD_FILES)
def test_method_blocks_hold_the_options_their_declarations_read(method):
    block = schema.method_defaults(method)
    read = registry.options_read(block)
    assert set(block) == {*schema.METHOD_CORE, *read}
    assert all(block[name] == option.default for name, option in read.items())
    assert set(read) <= set(schema.method_option_defaults())


def test_hand_built_config_lists_every_problem():
    config = json.loads(_load("catpo.py").to_json())
    config["model"]["foo"] = 1
    del config["train"]["num_steps"]
    config["method"]["betaa"] = 0.2
    config["optimizer"]["learning_rate"] = "fast"
    config["extra"] = {}
    message = _problems(config)
    for expected in ("model.foo: unknown field", "train.num_steps: missing",
                     "method.betaa: unknown field", "optimizer.learning_rate='fast'",
                     "extra: unknown section"):
        assert expected in message
    minimal = {key: value for key, value in json.loads(_load("dpo.py").to_json()).items()
               if key != "reference_settings"}
    minimal["method"] = {"name": "dpo", "terms": None, "token_weights": None}
    validate(minimal, device_count=8)


def test_value_checks_are_listed_together():
    config = _load("catpo.py", "data.buckets=(96,64)", "optimizer.warmup_ratio=1.5",
                   "model.dtype=fp8", "optimizer.learning_rate=0", "method.token_weights=bogus",
                   "method.layer_band=(0.7,0.6)", "model.lora.targets=('qkv',)")
    message = _problems(config, device_count=8)
    for expected in ("data.buckets=(96, 64)", "warmup_ratio=1.5", "model.dtype='fp8'",
                     "learning_rate=0.0 must be > 0", "token_weights='bogus'", "layer_band",
                     "unknown ['qkv']"):
        assert expected in message
    assert "needs model.checkpoint" in _problems(_load("dpo.py", "model.init=checkpoint"))
    assert "is not one of" in _problems(_load("dpo.py", "method.name=nope"))


def test_base_helpers(tmp_path):
    base = config_loading.config_module(CONFIGS / "base.py")
    assert base.model(lora=dict(rank=8)).lora.to_dict()["rank"] == 8
    with pytest.raises(ValueError, match="no field 'rnak'"):
        base.model(lora=dict(rnak=8))
    with pytest.raises(ValueError, match="unknown method options"):
        base.method("dpo", lamda_calib=0.1)
    with pytest.raises(ValueError, match="is not one of"):
        base.method("nope")
    dpo, catpo = base.method("dpo"), base.method("catpo")
    assert "lambda_calib" not in dpo and "alpha" not in dpo and "alpha" in catpo
    assert catpo.terms.to_dict() == {"dpo": 1.0, "token_kl": 0.03}
    assert catpo.token_weights == "catpo" and dpo.token_weights == "none"
    # The optimizer's learning rate and the step count have no default.
    unset = base.experiment("x", base.method("dpo"))
    message = _problems(unset)
    assert "optimizer.learning_rate: not set" in message and "train.num_steps: not set" in message


def test_the_train_cli_names_an_unknown_field_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "mmpo_jax.train", "--config=configs/dpo.py", "--config.method.bta=0.2"],
        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
        cwd=pathlib.Path(__file__).parents[2])
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "FATAL Flags parsing error: unknown config field 'bta' Did you mean \"beta\" instead of \"bta\"?"]


# ----------------------------------------------------------------------------- run length


def test_run_length_follows_the_splits_size():
    config = _load("dpo.py", "train.num_steps=0", "data.num_epochs=3")
    assert epoch_steps(config, 100) == 3 * 4  # ceil(100 / 32): the last batch is padded
    assert epoch_steps(config, 100, process_count=2) == 3 * 4  # 50 records in 16s per process
    dropping = _load("dpo.py", "train.num_steps=0", "data.num_epochs=3", "data.drop_remainder=true")
    assert epoch_steps(dropping, 100) == 3 * 3
    validate(config, device_count=8, num_records=100)
    assert "no full batch of data.batch_size=32 in the 20 records" in _problems(
        dropping, device_count=8, num_records=20)
    fisao = _load("fisao.py", "train.num_steps=0", "data.num_epochs=2")
    assert epoch_steps(fisao, 100) == math.ceil(2 * 100 / (32 // fisao.rollout.num_samples))
    # a fixed step count the epochs cannot feed (the iterator would run dry mid-run)
    message = _problems(_load("dpo.py", "train.num_steps=13", "data.num_epochs=3"),
                        device_count=8, num_records=100)
    assert ("train.num_steps=13 needs 13 batches, but data.num_epochs=3 over the 100 records of "
            "shapes_world/preference gives 12") in message
    validate(_load("dpo.py", "train.num_steps=12", "data.num_epochs=3"), num_records=100)
    validate(_load("dpo.py", "train.num_steps=13"), num_records=100)  # num_epochs=0: endless
    assert "set train.num_steps=N or data.num_epochs=E" in _problems(
        _load("dpo.py", "train.num_steps=0"))


def test_combinations_the_loop_refuses_are_config_problems():
    message = _problems(_load(
        "catpo.py", "data.dataset=rlhf_v", "model.lora.enabled=true",
        "model.freeze_vision=false", "model.train_projector=false"), device_count=8)
    for expected in ("model.init='sft_base' trains the tiny SFT base on the shapes world, not "
                     "'rlhf_v'; set model.init='checkpoint'",
                     "set model.freeze_vision=true, or model.lora.enabled=false",
                     "eval.enabled=true evaluates on the shapes world's 'test_caption'/'test_pope' "
                     "splits, which 'rlhf_v' lacks; set eval.enabled=false"):
        assert expected in message
    assert "method 'fisao' on data.dataset='generic_jsonl'" in _problems(_load(
        "fisao.py", "data.dataset=generic_jsonl", "model.init=random", "eval.enabled=false"))
    # P2-DPO's world is its prompt source
    assert "not 'rlhf_v'" in _problems(_load("p2dpo.py", "pairs.source_dataset=rlhf_v"))


def test_an_image_size_the_model_does_not_take_names_the_fix():
    config = _load("dpo.py", "data.dataset=generic_jsonl", "model.init=random",
                   "eval.enabled=false")
    message = _problems(config, image_sizes=(336, 64))
    assert ("the images of data.dataset='generic_jsonl' are preprocessed to 336 px but the vision "
            "tower of model.preset='tiny' takes 64 px; set data.image_size=64, or use a model "
            "(preset or checkpoint) whose vision tower takes 336-px images") in message
    validate(config, image_sizes=(64, 64))
    assert "data.image_size=-1 must lie in [0, inf]" in _problems(_load("dpo.py",
                                                                        "data.image_size=-1"))
    assert "data.too_long='cut' is not one of ('truncate', 'skip')" in _problems(
        _load("dpo.py", "data.too_long=cut"))


# ----------------------------------------------------------------------------- config files


@pytest.mark.parametrize("text, expected", [
    ("def get_config(:\n", r"bad.py: cannot be executed: SyntaxError: .* \(bad.py:1\)"),
    ("import nothing_here\n", r"bad.py: cannot be executed: ModuleNotFoundError: No module named "
                              r"'nothing_here' \(bad.py:1\)"),
    ("x = 1\n", r"bad.py: defines no get_config\(\) function"),
    ("def get_config(arg=None):\n    return {}[arg]\n",
     r"bad.py:key: get_config\('key'\) raised KeyError: 'key' \(bad.py:2\)"),
    ("def get_config(arg=None):\n    return 3\n",
     r"bad.py: get_config\(\) returned int, not a ConfigDict"),
])
def test_an_unloadable_config_file_is_one_line_naming_it(tmp_path, text, expected):
    (tmp_path / "bad.py").write_text(text)
    path = "bad.py:key" if "[arg]" in text else "bad.py"
    with pytest.raises(ConfigError) as error:
        config_loading.load_config_file(path)
    assert "\n" not in str(error.value)
    assert re.fullmatch(expected, str(error.value)), str(error.value)


def test_a_missing_config_file_names_the_closest_one(tmp_path):
    near = str(CONFIGS / "dppo.py")
    with pytest.raises(ConfigError, match=rf"^{near}: no such config file \(cwd .*\); did you "
                                          rf"mean {CONFIGS / 'dpo.py'}\?$"):
        config_loading.load_config_file(near)
    with pytest.raises(ConfigError, match="is a directory"):
        config_loading.load_config_file(str(CONFIGS))
    with pytest.raises(ConfigError, match="no folder 'nowhere'"):
        config_loading.load_config_file("nowhere/dpo.py")


def test_config_file_arguments_are_found_in_every_flag_form():
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values)
    flags.DEFINE_string("output_dir", "", "", flag_values=flag_values)
    argv = ["prog", "--config=a.py:x", "--output_dir=b.py", "-config", "c.py",
            "--config.seed=1", "--", "--config=d.py"]
    assert config_loading.config_file_arguments(argv, flag_values) == [
        ("config", "a.py:x"), ("config", "c.py")]
