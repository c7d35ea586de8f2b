"""`config.preflight`: every placeholder and path a run reads, checked at once, naming the flags."""

import json
import pathlib

import pytest

from mmpo_jax.config import preflight
from mmpo_jax.config.checks import ConfigError
from mmpo_jax.config.loading import load_config
from mmpo_jax.data.sources import load_split
from mmpo_jax.data.tokenizer import build_word_tokenizer
from mmpo_jax.objectives import registry
from tests.data import fixtures as fx

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tokenizer, an orbax model folder (with processor files), a llava-hf folder, RLHF-V's parquet, an empty
    folder (the checks read names only: the files' contents are the loaders' business)."""
    root = tmp_path_factory.mktemp("preflight")
    build_word_tokenizer(["a", "cat"], model_max_length=64).save_pretrained(str(root / "tok"))
    (root / "orbax" / "params").mkdir(parents=True)
    (root / "orbax" / "config.json").write_text("{}")
    (root / "orbax" / "processor_config.json").write_text("{}")  # saved by `convert import`
    (root / "hf").mkdir()
    (root / "hf" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (root / "hf" / "model.safetensors").write_bytes(b"")
    fx.write_rlhf_v(str(root / "rlhf_v"), [fx.rlhf_v_row(p) for p in fx.make_pairs(2)])
    (root / "empty").mkdir()
    return root


def _preset(method: str, tmp_path, *overrides: str):
    return load_config(f"{CONFIGS / 'llava_1_5_7b_gpu.py'}:{method}",
                       (f"data.data_dir={tmp_path / 'data'}", *overrides))


def _message(config, **kwargs) -> str:
    with pytest.raises(ConfigError) as error:
        preflight.check(config, device_count=1, **kwargs)
    return str(error.value)


def test_every_placeholder_of_a_preset_is_named_at_once(tmp_path):
    unset = (f"model.checkpoint={tmp_path / 'orbax'}", f"data.tokenizer={tmp_path / 'tok'}")
    message = _message(_preset("p2dpo", tmp_path, *unset))
    lines = message.splitlines()
    assert lines[0] == "config 'llava_1_5_7b_p2dpo' is invalid:" and len(lines) == 5
    for flag in ("--config.model.checkpoint=", "--config.data.tokenizer=",
                 "--config.data.manual_dir is not set", "--config.pairs.source_manual_dir is not "
                 "set and rlhf_v is not prepared under"):
        assert flag in message
    assert "convert import" in message and "save_pretrained" in message
    catpo = _message(_preset("catpo", tmp_path, *unset, "optimizer.grad_accum_steps=3"))
    assert "--config.data.manual_dir is not set and rlhf_v is not prepared" in catpo
    assert "data.batch_size=32 is not divisible by optimizer.grad_accum_steps=3" in catpo
    # generate_pairs reads the prompt source and the model, never the pairs' folder
    generating = _message(_preset("p2dpo", tmp_path, *unset), generating_pairs=True)
    assert "--config.pairs.source_manual_dir" in generating
    assert "--config.data.manual_dir" not in generating


def test_filled_placeholders_pass(tmp_path, files):
    filled = (f"model.checkpoint={files / 'orbax'}", f"data.tokenizer={files / 'tok'}")
    preflight.check(_preset("catpo", tmp_path, *filled, f"data.manual_dir={files / 'rlhf_v'}"),
                    device_count=1)
    preflight.check(_preset("p2dpo", tmp_path, *filled, f"data.manual_dir={tmp_path / 'pairs'}",
                            f"pairs.source_manual_dir={files / 'rlhf_v'}"), device_count=1)


@pytest.mark.parametrize("method", sorted(registry.methods()))
def test_every_method_config_passes_as_shipped(tmp_path, method):
    """The shapes world is generated on first use and ships its tokenizer: nothing to fill in."""
    config = load_config(str(CONFIGS / f"{method}.py"), (f"data.data_dir={tmp_path}",))
    preflight.check(config, device_count=8)
    if "pairs" in config:
        preflight.check(config, device_count=8, generating_pairs=True)


def test_the_tokenizer_and_processor_come_from_the_imported_checkpoint(tmp_path, files):
    """The presets leave data.tokenizer unset: `convert import` saved both beside the model."""
    imported = tmp_path / "imported"
    (imported / "params").mkdir(parents=True)
    (imported / "config.json").write_text("{}")
    build_word_tokenizer(["a"], model_max_length=8).save_pretrained(str(imported))
    data = f"data.manual_dir={files / 'rlhf_v'}"
    message = _message(_preset("dpo", tmp_path, f"model.checkpoint={imported}", data))
    assert message.splitlines()[1:] == [
        f"  - no processor_config.json or preprocessor_config.json in --config.model.checkpoint="
        f"'{imported}': the image preprocessing is read from the model's processor files; import "
        "the model with `python -m mmpo_jax.convert import <llava-hf folder> <orbax folder> "
        "--image_aspect_ratio pad` (which saves them), or set --config.data.tokenizer to the "
        "llava-hf folder"]
    (imported / "preprocessor_config.json").write_text("{}")
    preflight.check(_preset("dpo", tmp_path, f"model.checkpoint={imported}", data), device_count=1)
    message = _message(_preset("dpo", tmp_path, f"model.checkpoint={files / 'orbax'}", data))
    assert "--config.data.tokenizer is not set, rlhf_v ships no tokenizer and" in message


def test_paths_holding_the_wrong_thing_say_what_is_missing(tmp_path, files):
    message = _message(_preset(
        "dpo", tmp_path, f"model.checkpoint={files / 'hf'}", f"data.tokenizer={files / 'empty'}",
        f"data.manual_dir={files / 'empty'}"))
    assert f"--config.model.checkpoint='{files / 'hf'}' is a transformers checkpoint" in message
    assert f"--config.data.tokenizer='{files / 'empty'}': no tokenizer_config.json there" in message
    assert f"--config.data.manual_dir='{files / 'empty'}': no *.parquet file in" in message
    message = _message(_preset(
        "dpo", tmp_path, f"model.checkpoint={files / 'empty'}", f"data.tokenizer={files / 'tok'}",
        f"data.manual_dir={files / 'rlhf_v'}", "data.builder={'strikt': True}"))
    assert "has no config.json or params; expected a directory written by" in message
    assert "--config.data.builder: unknown option(s) ['strikt'] for builder 'rlhf_v'" in message


def test_a_prepared_dataset_needs_no_manual_dir_but_refuses_another(tmp_path, files):
    load_split("rlhf_v", "train", data_dir=tmp_path / "data", manual_dir=files / "rlhf_v")
    filled = (f"model.checkpoint={files / 'orbax'}", f"data.tokenizer={files / 'tok'}")
    preflight.check(_preset("dpo", tmp_path, *filled), device_count=1)
    other = tmp_path / "other"
    fx.write_rlhf_v(str(other), [fx.rlhf_v_row(p) for p in fx.make_pairs(1)])
    message = _message(_preset("dpo", tmp_path, *filled, f"data.manual_dir={other}"))
    assert f"was prepared from '{files / 'rlhf_v'}'; unset --config.data.manual_dir" in message


def test_benchmark_files_and_combinations_are_checked_up_front(tmp_path, files):
    """The benchmarks section: an incomplete benchmark is a config problem, a file or folder it
    names that does not exist a preflight one, each naming its --config.benchmarks.* flag."""
    filled = (f"model.checkpoint={files / 'orbax'}", f"data.tokenizer={files / 'tok'}",
              f"data.manual_dir={files / 'rlhf_v'}")
    preflight.check(_preset("dpo", tmp_path, *filled), device_count=1)  # no benchmark: none run
    missing = tmp_path / "absent.json"
    message = _message(_preset("dpo", tmp_path, *filled, f"benchmarks.pope_questions=('{missing}',)",
                               f"benchmarks.amber_dir={files / 'empty'}", "benchmarks.every=-1"))
    assert "benchmarks: pope_questions needs pope_images; amber_dir needs amber_images" in message
    message = _message(_preset("dpo", tmp_path, *filled, f"benchmarks.pope_questions=('{missing}',)",
                               f"benchmarks.pope_images={files / 'empty'}", "benchmarks.every=-1",
                               f"benchmarks.amber_dir={files / 'empty'}",
                               f"benchmarks.amber_images={files / 'empty'}"))
    assert message.splitlines()[1:] == [
        "  - benchmarks.every=-1 must be >= 0",
        f"  - --config.benchmarks.pope_questions='{missing}': no such file",
        f"  - --config.benchmarks.amber_queries='query/query_all.json': no such file"]
