"""The evidence study end to end on a micro budget: two trained rows, one seed, two steps each.

Checks that the report, results.json and the plots are written, that the selection phase read
no test split (a recording wrapper around the real `load_split`), and that a second invocation
trains and evaluates nothing (every run cached).
"""

from __future__ import annotations

import json
import pathlib

import pytest

from mmpo_jax.config.loading import load_config
from mmpo_jax.evidence import protocol as protocol_lib
from mmpo_jax.evidence import runs, selection, study
from mmpo_jax.evidence.protocol import Protocol
from mmpo_jax.training import experiment

WORLD = {"sft_size": 16, "preference_size": 16, "test_caption_size": 2, "test_pope_images": 1}


def _protocol(tmp_path) -> Protocol:
    return Protocol(rows=("control", "dpo"), seeds=(0,), learning_rates=(1e-3,),
                    betas=(0.1,), updates=2, batch_size=8, world=WORLD, bootstrap_samples=20,
                    logp_records=4, overrides=(
                        f"data.data_dir={tmp_path / 'data'}", "model.init=random",
                        "eval.num_samples=1", "eval.max_new_tokens=4",
                        "eval.batch_size=4", "checkpoint.async_save=false"))


@pytest.mark.slow
def test_micro_study_writes_its_report_selects_on_validation_and_resumes(tmp_path, monkeypatch):
    protocol = _protocol(tmp_path)
    test = protocol_lib.test_splits(protocol.world)
    read: list[tuple[str, dict]] = []
    real_load_split = experiment.load_split

    def recording_load_split(name, split, **options):
        read.append((split, {k: v for k, v in options.items() if k not in ("data_dir", "manual_dir")}))
        return real_load_split(name, split, **options)

    monkeypatch.setattr(experiment, "load_split", recording_load_split)
    lines: list[str] = []
    out, cache = tmp_path / "out", tmp_path / "cache"
    real_select = study.select_settings
    selection_reads: list[tuple[str, dict]] = []

    def select_and_record(context):
        start = len(read)
        result = real_select(context)
        selection_reads.extend(read[start:])
        return result

    monkeypatch.setattr(study, "select_settings", select_and_record)
    results = study.run_study(protocol, out, cache, command="test", log=lines.append)

    # The selection evaluated on validation splits only: no record of a test split was read.
    evaluated = [(split, builder) for split, builder in selection_reads
                 if split not in ("sft", "preference")]
    assert evaluated, "the selection evaluated nothing"
    assert all((split, builder) not in ((test.caption, dict(test.builder)),
                                        (test.pope, dict(test.builder)))
               for split, builder in evaluated), evaluated
    assert all(builder["seed"] == protocol_lib.VALIDATION_SEED_OFFSET for _, builder in evaluated)
    # ... and the measurement did read the test splits.
    assert (test.caption, dict(test.builder)) in read[len(selection_reads):]

    report = (out / "EVIDENCE.md").read_text()
    assert report.index("## Protocol") < report.index("## Headline") < report.index("## Test")
    headline = report[report.index("## Headline"):report.index("## Chosen settings")]
    assert "vs control, CHAIR_i sampled" in headline
    assert headline.count("\n| ") == 4  # the header and the three rows
    for text in ("SFT base", "control (SFT on chosen)", "DPO", "validation", "CHAIR_i sampled",
                 "Paired differences to the control", json.dumps(WORLD)):
        assert text in report, text
    stored = json.loads((out / "results.json").read_text())
    assert set(stored["rows"]) == {"base", "control", "dpo"}
    assert set(stored["selection"]) == {"control", "dpo"}
    assert all(len(choice["candidates"]) == 1 for choice in stored["selection"].values())
    assert "sampled/chair_i" in stored["rows"]["dpo"]["paired"]["control"]
    # Caption length beside CHAIR, and where DPO's margin comes from at its last step.
    dpo = stored["rows"]["dpo"]["summary"]
    assert {"mentions_per_caption", "sampled/mentions_per_caption", "train/rewards/margins",
            "train/rewards/accuracy"} <= set(dpo)
    assert "train/rewards/margins" not in stored["rows"]["control"]["summary"]
    assert "mentions / caption sampled" in report and "reward margin" in report
    assert stored["trained_now"] == 2  # one per row: the test evaluation reuses seed 0's runs
    for name in ("bar_sampled_chair_i.png", "chair_vs_recall.png", "curves.png", "probes.png"):
        assert (out / name).stat().st_size > 1000, name
        assert name in stored["plots"]

    # A second invocation reuses every cached run: nothing is trained or evaluated again.
    again = study.run_study(protocol, tmp_path / "out2", cache, command="test", log=lines.append)
    assert again["trained_now"] == 0 and again["evaluated_now"] == 0
    assert again["rows"]["dpo"]["summary"] == results["rows"]["dpo"]["summary"]
    # ... and still reports what those runs cost when they ran.
    assert again["runs"] == results["runs"] and again["runs_s"] == pytest.approx(results["runs_s"])
    assert results["runs_s"] > 0 and "took" in (tmp_path / "out2" / "EVIDENCE.md").read_text()


def test_the_selection_refuses_a_test_evaluation():
    validation = {"splits": {"role": "validation", "caption": "validation_caption"},
                  "metrics": {"sampled/chair_i": 0.2, "sampled/recall": 0.8}}
    test = {"splits": {"role": "test", "caption": "test_caption"},
            "metrics": {"sampled/chair_i": 0.1, "sampled/recall": 0.9}}
    with pytest.raises(selection.SelectionError, match="'test' splits"):
        selection.choose([({"learning_rate": 1e-5}, test)], validation, recall_tolerance=0.02)
    with pytest.raises(selection.SelectionError, match="'test' splits"):
        selection.choose([({"learning_rate": 1e-5}, validation)], test, recall_tolerance=0.02)


def test_the_selection_rule_keeps_recall_then_minimises_chair():
    def evaluation(chair_i, recall):
        return {"splits": {"role": "validation", "caption": "v"},
                "metrics": {"sampled/chair_i": chair_i, "sampled/recall": recall}}

    base = evaluation(0.3, 0.80)
    grid = [({"learning_rate": 1e-5}, evaluation(0.20, 0.79)),   # eligible
            ({"learning_rate": 2e-5}, evaluation(0.10, 0.70)),   # lowest CHAIR, lost recall
            ({"learning_rate": 5e-5}, evaluation(0.15, 0.785))]  # eligible, lowest of those
    choice = selection.choose(grid, base, recall_tolerance=0.02)
    assert choice.settings == {"learning_rate": 5e-5} and choice.eligible
    none_kept = selection.choose(grid[1:2], base, recall_tolerance=0.02)
    assert none_kept.settings == {"learning_rate": 2e-5} and not none_kept.eligible


def test_v1_validation_is_another_sample_and_v2_has_its_own_splits():
    v1 = protocol_lib.validation_splits({"seed": 3})
    assert (v1.caption, v1.builder["seed"]) == ("test_caption", 3 + protocol_lib.VALIDATION_SEED_OFFSET)
    v2 = protocol_lib.validation_splits({"world": "v2"})
    assert (v2.caption, v2.pope, dict(v2.builder)) == ("validation_caption", "validation_pope",
                                                       {"world": "v2"})


def test_a_v2_study_trains_with_the_v2_config_files_sections():
    """The v2 world's base learns shapes only with its tower first, its captions fit only its
    buckets, and P2-DPO's I_aug is two images there: the study reads them from
    configs/shapes_world_v2.py, as the main job does; v1 rows are the method files' own."""
    v2 = Protocol(world={"world": "v2"})
    base = v2.world_config()
    main_job = load_config("configs/shapes_world_v2.py:sft")
    assert base.sft_base.to_dict() == main_job.sft_base.to_dict()
    assert (base.data.buckets, base.model.preset) == (main_job.data.buckets, "tiny_v2")
    p2dpo = v2.row_config(protocol_lib.rows_lib.ROWS["p2dpo"], {"learning_rate": 1e-4}, 0,
                          data_root=pathlib.Path("/tmp/study"))
    assert p2dpo.method.combine_mode == "two_images"
    assert (p2dpo.pairs.source_builder.to_dict(), p2dpo.data.builder.to_dict()) == ({"world": "v2"}, {})
    assert p2dpo.data.manual_dir == "/tmp/study/p2dpo_pairs"
    v1 = Protocol().row_config(protocol_lib.rows_lib.ROWS["catpo"], {}, 0, data_root=None)
    assert (v1.data.buckets, v1.sft_base.vision_steps) == (load_config("configs/catpo.py").data.buckets, 0)


def test_every_row_budget_is_the_same_number_of_updates():
    protocol = Protocol()
    for key in ("dpo", "fisao", "control"):
        config = protocol.row_config(protocol_lib.rows_lib.ROWS[key], {"learning_rate": 1e-5},
                                     0, data_root=None)
        updates = config.train.num_steps * (
            config.rollout.ppo_epochs if config.method.name == "fisao" else 1)
        assert (updates, config.data.batch_size) == (protocol.updates, protocol.batch_size), key
    assert runs.digest({"a": 1}) != runs.digest({"a": 2})


def test_the_command_line_names_a_bad_row_in_one_line(capsys):
    from mmpo_jax.evidence.__main__ import parse_protocol

    with pytest.raises(SystemExit) as exit_info:
        parse_protocol(["--methods", "dpo,catpoo"])
    assert exit_info.value.code == 2
    assert "unknown row(s) ['catpoo']; valid:" in capsys.readouterr().err
    protocol, _ = parse_protocol(["--quick", "--world", "world=v2", "--seeds", "3"])
    assert protocol.rows == ("base", "control", "dpo", "catpo") and protocol.seeds == (3,)
    assert protocol.world == {"world": "v2"} and "model.preset=tiny_v2" in protocol.world_overrides()


def test_a_study_shares_its_compilations_through_a_persistent_cache_in_its_folder(tmp_path):
    """In a fresh process (no cache configured), `share_compilations` puts XLA's persistent
    cache under the study's folder and a compiled program lands there; a configured cache (the
    test session's own) is left in place."""
    import os
    import subprocess
    import sys

    import jax

    assert runs.share_compilations(tmp_path) == pathlib.Path(jax.config.jax_compilation_cache_dir)
    assert not (tmp_path / runs.COMPILATION_CACHE).exists()
    script = (
        "import sys, pathlib, jax, jax.numpy as jnp\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)\n"
        "from mmpo_jax.evidence import runs\n"
        "print(runs.share_compilations(pathlib.Path(sys.argv[1])))\n"
        "jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, check=True,
                          capture_output=True, text=True)
    assert done.stdout.strip() == str(tmp_path / runs.COMPILATION_CACHE)
    assert any((tmp_path / runs.COMPILATION_CACHE).iterdir())
