"""grain pipelines: determinism, epochs, sharding, drops, extras, resume through orbax, compiles."""

import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmpo_jax.data import example_randomness, image_processing, pipeline, row_encoding
from mmpo_jax.data.batch import Batch, SftBatch
from mmpo_jax.data.template import PROMPT_TOO_LONG
from mmpo_jax.data.tokenizer import build_word_tokenizer

WORDS = ("user", "assistant", ":", "what", "is", "in", "the", "image", "?", "a", "red", "blue",
         "green", "circle", "square", "star", "and", ",", ".")
COLORS, SHAPES = ("red", "blue", "green"), ("circle", "square", "star")
NUM_IMAGE_TOKENS = 4
IMAGE_SIZE = 8
BUCKETS = (16, 32, 64)


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(WORDS, model_max_length=512)


@pytest.fixture(scope="module")
def image_config():
    return image_processing.tiny(IMAGE_SIZE)


def _caption(rng, num_objects):
    objects = [f"a {rng.choice(COLORS)} {rng.choice(SHAPES)}" for _ in range(num_objects)]
    return ", ".join(objects) + "."


def make_records(n, seed=0):
    """Preference records in the data contract's format, with varied lengths (1..12 objects)."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        count = int(rng.integers(1, 13))
        records.append({
            "id": f"ex{i}",
            "image": rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
            "prompt": "what is in the image ?",
            "chosen": _caption(rng, count),
            "rejected": _caption(rng, max(1, count - 1)),
            "metadata": "{}",
        })
    return records


def _pipeline(records, tokenizer, image_config, **overrides):
    kwargs = dict(tokenizer=tokenizer, image_config=image_config,
                  num_image_tokens=NUM_IMAGE_TOKENS, batch_size=4, buckets=BUCKETS, seed=0,
                  num_epochs=1, shard_by_process=False)
    kwargs.update(overrides)
    return pipeline.preference_pipeline(records, **kwargs)


def _indices(batches):
    return [b.example_index[b.example_mask == 1].tolist() for b in batches]


def _assert_batches_equal(left, right):
    assert len(left) == len(right)
    for a, b in zip(left, right):
        jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_batch_rows_match_their_records(tokenizer, image_config):
    records = make_records(6)
    batches = list(_pipeline(records, tokenizer, image_config))
    assert len(batches) == 2 and all(isinstance(b, Batch) for b in batches)
    for batch in batches:
        for row, index in enumerate(batch.example_index):
            if index < 0:
                assert batch.example_mask[row] == 0 and batch.chosen_loss_mask[row].sum() == 0
                continue
            record = records[index]
            # one image per example, processed once, used by chosen and rejected alike
            np.testing.assert_array_equal(batch.pixel_values[row], image_config(record["image"]))
            for side in ("chosen", "rejected"):
                ids = getattr(batch, f"{side}_input_ids")[row]
                loss = getattr(batch, f"{side}_loss_mask")[row]
                text = tokenizer.decode(ids[loss == 1], skip_special_tokens=True)
                assert text == record[side]
                assert (ids == tokenizer.convert_tokens_to_ids("<image>")).sum() == NUM_IMAGE_TOKENS
        assert batch.corrupt_pixel_values is None and batch.noise_pixel_values is None
        assert batch.ref_chosen_logps is None and batch.robust_chosen_input_ids is None


def test_deterministic_by_seed_and_different_across_seeds(tokenizer, image_config):
    records = make_records(16)
    first = list(_pipeline(records, tokenizer, image_config, seed=3))
    again = list(_pipeline(records, tokenizer, image_config, seed=3))
    other = list(_pipeline(records, tokenizer, image_config, seed=4))
    _assert_batches_equal(first, again)
    assert _indices(first) != _indices(other)
    assert sorted(sum(_indices(first), [])) == sorted(sum(_indices(other), [])) == list(range(16))


def test_each_epoch_covers_every_example_once(tokenizer, image_config):
    records = make_records(10)
    it = _pipeline(records, tokenizer, image_config, num_epochs=3)
    batches = list(it)
    assert it.schedule.batches_per_epoch == 3 and it.num_batches == len(batches) == 9
    epochs = [sum(_indices(batches[e * 3:(e + 1) * 3]), []) for e in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(10))
    assert epochs[0] != epochs[1] != epochs[2]
    # 12 slots per epoch for 10 examples: the two padding rows close each epoch's last batch
    for batch in batches[2::3]:
        np.testing.assert_array_equal(batch.example_mask, [1, 1, 0, 0])
        np.testing.assert_array_equal(batch.example_index[2:], [-1, -1])
    assert it.stats.examples == 30 and it.stats.padding_rows == 6 and it.stats.dropped == {}


def test_no_shuffle_reads_in_order(tokenizer, image_config):
    batches = list(_pipeline(make_records(8), tokenizer, image_config, shuffle=False))
    assert _indices(batches) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_process_shards_are_disjoint_cover_the_data_and_take_equal_steps(tokenizer, image_config):
    records = make_records(11)
    shards = [list(_pipeline(records, tokenizer, image_config, num_epochs=2,
                             shard_options=grain.sharding.ShardOptions(k, 2))) for k in range(2)]
    assert len(shards[0]) == len(shards[1]) == 4  # ceil(11 / 2) = 6 slots -> 2 batches per epoch
    for epoch in range(2):
        seen = [sum(_indices(shard[epoch * 2:(epoch + 1) * 2]), []) for shard in shards]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(11))


def test_drop_remainder_keeps_only_full_batches(tokenizer, image_config):
    batches = list(_pipeline(make_records(10), tokenizer, image_config, drop_remainder=True))
    assert len(batches) == 2 and all(b.example_mask.all() for b in batches)


def test_dropped_examples_become_counted_padding_rows(tokenizer, image_config, caplog):
    records = make_records(8)
    records[1] = dict(records[1], prompt=" ".join(["what"] * 130))  # no room for any response
    records[5] = dict(records[5], chosen=_caption(np.random.default_rng(0), 25))  # > 64 tokens
    with caplog.at_level("WARNING"):
        it = _pipeline(records, tokenizer, image_config, shuffle=False, max_length=128)
    assert "exceeds the largest bucket" in caplog.text
    batches = list(it)
    assert len(batches) == 2  # the schedule does not shrink: dropped examples are masked rows
    np.testing.assert_array_equal(batches[0].example_mask, [1, 0, 1, 1])
    np.testing.assert_array_equal(batches[1].example_index, [4, -1, 6, 7])
    assert batches[1].chosen_loss_mask[1].sum() == 0
    assert it.stats.dropped == {PROMPT_TOO_LONG: 1, row_encoding.LONGER_THAN_BUCKETS: 1}
    assert it.stats.examples == 8 and it.stats.padding_rows == 2


@pytest.mark.parametrize("too_long", ["truncate", "skip"])
def test_responses_longer_than_max_length_are_counted_either_way(tokenizer, image_config, caplog,
                                                                 too_long):
    records = make_records(4)
    records[2] = dict(records[2], chosen=_caption(np.random.default_rng(0), 25))  # ~100 tokens
    it = _pipeline(records, tokenizer, image_config, shuffle=False, too_long=too_long)
    with caplog.at_level("INFO", logger="mmpo_jax.data.pipeline"):
        (batch,) = list(it)
    reason = row_encoding.RESPONSE_TOO_LONG
    assert batch.chosen_input_ids.shape[1] == BUCKETS[-1]  # max_length defaults to the bucket
    if too_long == "truncate":
        np.testing.assert_array_equal(batch.example_mask, [1, 1, 1, 1])
        assert batch.chosen_loss_mask[2, -1] == 1  # cut at max_length: supervised to the end,
        assert batch.chosen_input_ids[2, -1] != tokenizer.eos_token_id  # with no EOS
        assert (it.stats.truncated, it.stats.dropped) == ({reason: 1}, {})
    else:
        np.testing.assert_array_equal(batch.example_mask, [1, 1, 0, 1])
        assert (it.stats.truncated, it.stats.dropped) == ({}, {reason: 1})
    assert it.stats.examples == 4
    assert f"epoch 1 read; so far 4 examples, dropped {dict(it.stats.dropped)}" in caplog.text
    with pytest.raises(ValueError, match=r"too_long='cut'; valid: \('truncate', 'skip'\)"):
        _pipeline(records, tokenizer, image_config, too_long="cut")


def test_sft_pipeline_skips_too_long_responses_when_asked(tokenizer, image_config):
    records = make_records(2)
    records[0] = dict(records[0], chosen=_caption(np.random.default_rng(0), 25))
    it = pipeline.sft_pipeline(records, tokenizer=tokenizer, image_config=image_config,
                               num_image_tokens=NUM_IMAGE_TOKENS, batch_size=2, buckets=BUCKETS,
                               seed=0, shuffle=False, response_field="chosen",
                               shard_by_process=False, too_long="skip")
    (batch,) = list(it)
    np.testing.assert_array_equal(batch.example_mask, [0, 1])
    assert it.stats.dropped == {row_encoding.RESPONSE_TOO_LONG: 1}


def test_drop_stats_of_older_states_restore():
    state = {"examples": 3, "dropped": {"x": 1}, "padding_rows": 1}  # saved before "truncated"
    assert pipeline.DropStats.from_json(state) == pipeline.DropStats(3, {"x": 1}, 1, {})


def test_jit_compiles_at_most_once_per_bucket(tokenizer, image_config):
    traces = []

    @jax.jit
    def step(batch):
        traces.append(batch.sequence_length)
        ids, loss, attention = batch.concatenated_responses()
        return jnp.sum(ids * loss * attention) + jnp.sum(batch.pixel_values)

    lengths = []
    for batch in _pipeline(make_records(40), tokenizer, image_config, num_epochs=2):
        step(batch)
        lengths.append(batch.sequence_length)
    assert len(lengths) == 20 and set(lengths) <= set(BUCKETS)
    assert len(set(lengths)) >= 2  # the fixture really exercises several buckets
    assert sorted(traces) == sorted(set(lengths))


def test_extras_are_deterministic_per_example_and_epoch(tokenizer, image_config):
    records = [dict(r, ref_chosen_logps=-float(i), ref_rejected_logps=-2.0 * i)
               for i, r in enumerate(make_records(6))]
    extras = ("corrupt_pixel_values", "noise_pixel_values", "ref_logps")
    runs = [list(_pipeline(records, tokenizer, image_config, num_epochs=2, extras=extras,
                           seed=seed)) for seed in (0, 0, 1)]
    _assert_batches_equal(runs[0], runs[1])
    by_epoch_and_index = {}
    for epoch, batches in enumerate((runs[0][:2], runs[0][2:])):
        for batch in batches:
            assert batch.corrupt_pixel_values.shape == batch.pixel_values.shape
            assert batch.robust_chosen_input_ids is None and batch.ddw_clip_crop is None
            for row, index in enumerate(batch.example_index):
                if index >= 0:
                    np.testing.assert_array_equal(batch.ref_chosen_logps[row], -float(index))
                    by_epoch_and_index[epoch, int(index)] = batch.corrupt_pixel_values[row]
                    assert not np.array_equal(batch.corrupt_pixel_values[row],
                                              batch.pixel_values[row])
                    assert not np.array_equal(batch.noise_pixel_values[row],
                                              batch.pixel_values[row])
    # a new epoch draws a new corruption for the same example
    assert not np.array_equal(by_epoch_and_index[0, 0], by_epoch_and_index[1, 0])
    other_seed = {int(i): b.corrupt_pixel_values[r] for b in runs[2][:2]
                  for r, i in enumerate(b.example_index) if i >= 0}
    assert not np.array_equal(other_seed[0], by_epoch_and_index[0, 0])


@pytest.mark.parametrize("normalisation", ["v1", "clip"])
def test_noise_extra_is_add_diffusion_noise_under_the_image_normalisation(tokenizer, normalisation):
    """The noise image of each row is `add_diffusion_noise` with the example key and the image
    config's mean / std: the same pixel-space noise (CLIP strength) under either normalisation."""
    from mmpo_jax.data import interventions
    image_config = (image_processing.tiny(IMAGE_SIZE) if normalisation == "v1" else image_processing.tiny(
        IMAGE_SIZE, mean=image_processing.CLIP_MEAN, std=image_processing.CLIP_STD))
    records = make_records(4)
    (batch,) = _pipeline(records, tokenizer, image_config, extras=("noise_pixel_values",))
    mean, std = np.asarray(image_config.mean), np.asarray(image_config.std)
    relative = []  # pixel-space noise over the paper's std, every row and channel
    for row, index in enumerate(batch.example_index):
        key = example_randomness.example_key(0, 0, int(index), "noise_pixel_values")
        expected = interventions.add_diffusion_noise(key, jnp.asarray(batch.pixel_values[row]),
                                                     mean=image_config.mean, std=image_config.std)
        np.testing.assert_allclose(batch.noise_pixel_values[row], expected, rtol=1e-6, atol=1e-6)
        clean = records[int(index)]["image"] / 255.0
        noise = batch.noise_pixel_values[row] * std + mean - (0.7342 * clean + 0.2658 * np.asarray(
            image_processing.CLIP_MEAN))
        relative.append(noise / (0.679 * np.asarray(image_processing.CLIP_STD)))
    assert np.std(relative) == pytest.approx(1.0, abs=0.1)  # 768 draws: ~2.5 % sampling error


def test_unknown_extra_is_rejected(tokenizer, image_config):
    with pytest.raises(ValueError, match="unknown extras.*'crop'"):
        _pipeline(make_records(2), tokenizer, image_config, extras=("crop",))


def test_buckets_too_small_for_the_template_name_the_settings_to_raise(tokenizer, image_config):
    # The prompt template and its 4 image placeholders alone need more than 6 tokens.
    with pytest.raises(ValueError, match=r"empty example .* max_length=6 tokens: raise data.max_length "
                                         r"and the largest of data.buckets.*two_images"):
        _pipeline(make_records(2), tokenizer, image_config, buckets=(6,))


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("via", ["grain_handler", "json"])
def test_resume_from_orbax_checkpoint_sees_the_same_batches(tokenizer, image_config, tmp_path, via):
    records = make_records(10)
    kwargs = dict(num_epochs=3, extras=("corrupt_pixel_values",), seed=7)
    uninterrupted = list(_pipeline(records, tokenizer, image_config, **kwargs))

    it = _pipeline(records, tokenizer, image_config, **kwargs)
    head = _take(it, 4)  # crosses the first epoch boundary
    stats_at_save = it.stats
    save = (grain.checkpoint.CheckpointSave(it) if via == "grain_handler"
            else ocp.args.JsonSave(it.get_state()))
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(4, args=ocp.args.Composite(data=save))
        manager.wait_until_finished()
    _take(it, 2)  # the old run goes on; the checkpoint must not care

    resumed = _pipeline(records, tokenizer, image_config, **kwargs)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        if via == "grain_handler":
            manager.restore(4, args=ocp.args.Composite(
                data=grain.checkpoint.CheckpointRestore(resumed)))
        else:
            state = manager.restore(4, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
            resumed.set_state(state["data"])
    assert resumed.stats == stats_at_save
    _assert_batches_equal(head + list(resumed), uninterrupted)
    assert resumed.stats == pipeline.DropStats(examples=30, dropped={}, padding_rows=6)


def test_state_is_json(tokenizer, image_config):
    it = _pipeline(make_records(6), tokenizer, image_config)
    next(it)
    state = it.get_state()
    assert json.loads(json.dumps(state)) == state


def test_sft_pipeline_supervises_the_chosen_field(tokenizer, image_config):
    records = make_records(5)
    it = pipeline.sft_pipeline(records, tokenizer=tokenizer, image_config=image_config,
                               num_image_tokens=NUM_IMAGE_TOKENS, batch_size=2, buckets=BUCKETS,
                               seed=0, shuffle=False, response_field="chosen",
                               shard_by_process=False)
    batches = list(it)
    assert len(batches) == 3 and all(isinstance(b, SftBatch) for b in batches)
    np.testing.assert_array_equal(batches[-1].example_mask, [1, 0])
    for batch in batches:
        for row, index in enumerate(batch.example_index):
            if index >= 0:
                ids = batch.input_ids[row][batch.loss_mask[row] == 1]
                assert tokenizer.decode(ids, skip_special_tokens=True) == records[index]["chosen"]


def test_shapes_world_split_through_both_pipelines(tmp_path):
    """Integration with the TFDS builder, `load_split` and the tokenizer saved with the data."""
    from mmpo_jax.data.sources import load_split
    from mmpo_jax.data.tokenizer import load_tokenizer

    sizes = dict(sft_size=12, preference_size=10, test_caption_size=1, test_pope_images=1)
    preference = load_split("shapes_world", "preference", data_dir=tmp_path, **sizes)
    tokenizer = load_tokenizer(preference.tokenizer_path)
    config = image_processing.tiny(64)
    it = pipeline.preference_pipeline(
        preference, tokenizer=tokenizer, image_config=config, num_image_tokens=16,
        batch_size=4, buckets=(64, 128), seed=0, shard_by_process=False)
    batches = list(it)
    assert len(batches) == 3 and it.stats.examples == 10 and it.stats.dropped == {}
    first = batches[0]
    record = preference[int(first.example_index[0])]
    np.testing.assert_array_equal(first.pixel_values[0], config(record["image"]))
    chosen = first.chosen_input_ids[0][first.chosen_loss_mask[0] == 1]
    assert tokenizer.decode(chosen, skip_special_tokens=True) == record["chosen"]

    sft = load_split("shapes_world", "sft", data_dir=tmp_path, **sizes)
    sft_batches = list(pipeline.sft_pipeline(
        sft, tokenizer=tokenizer, image_config=config, num_image_tokens=16, batch_size=8,
        buckets=(64, 128), seed=0, shard_by_process=False))
    assert sorted(sum(_indices(sft_batches), [])) == list(range(12))


def test_p2dpo_extras_read_their_record_fields(tokenizer, image_config):
    rng = np.random.default_rng(1)
    records = [dict(r, robust_chosen=_caption(rng, 2), robust_rejected=_caption(rng, 9),
                    focus_aug_image=rng.integers(0, 256, (12, 10, 3), dtype=np.uint8),
                    focus_deg_image=rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8),
                    ddw_clip_crop=0.5 + i, ddw_clip_full=0.25 * i,
                    noise_key=example_randomness.noise_key(9, 10 * i, 300))
               for i, r in enumerate(make_records(3))]
    batch, = _pipeline(records, tokenizer, image_config,
                       extras=("robust_pair", "focus_images", "ddw_clip"))
    # the robust pair is scored on the noise image of its stored key, not on a per-epoch draw
    assert batch.noise_pixel_values is None
    assert batch.corrupt_pixel_values is None and batch.ref_chosen_logps is None
    for row, index in enumerate(batch.example_index[:3]):
        record = records[index]
        for side in ("robust_chosen", "robust_rejected"):
            ids = getattr(batch, f"{side}_input_ids")[row]
            text = tokenizer.decode(ids[getattr(batch, f"{side}_loss_mask")[row] == 1],
                                    skip_special_tokens=True)
            assert text == record[side]
        np.testing.assert_array_equal(batch.focus_aug_pixel_values[row],
                                      image_config(record["focus_aug_image"]))
        np.testing.assert_array_equal(batch.focus_deg_pixel_values[row],
                                      image_config(record["focus_deg_image"]))
        np.testing.assert_array_equal(batch.robust_noise_pixel_values[row], example_randomness.noise_image(
            image_config(record["image"]), seed=9, record_index=10 * index, step=300,
            image_config=image_config))
        assert batch.ddw_clip_crop[row] == np.float32(0.5 + index)
        assert batch.ddw_clip_full[row] == np.float32(0.25 * index)
    del records[1]["noise_key"]
    with pytest.raises(ValueError, match="needs noise_key"):
        list(_pipeline(records, tokenizer, image_config, extras=("robust_pair",)))
    assert batch.robust_rejected_input_ids.shape == batch.chosen_input_ids.shape


def test_frequent_bucket_overflow_is_reported(tokenizer, image_config, caplog):
    records = make_records(pipeline.DROP_WARNING_MIN_EXAMPLES)
    long_caption = _caption(np.random.default_rng(0), 25)
    for i in range(0, len(records), 10):  # 10% of the examples exceed the largest bucket
        records[i] = dict(records[i], rejected=long_caption)
    it = _pipeline(records, tokenizer, image_config, batch_size=20, max_length=256)
    with caplog.at_level("WARNING"):
        batches = list(it)
    assert it.stats.dropped == {row_encoding.LONGER_THAN_BUCKETS: 10}
    assert sum(int(b.example_mask.sum()) for b in batches) == 90
    assert "10 of 100 examples were longer than the largest bucket" in caplog.text
    truncating = _pipeline(records, tokenizer, image_config, batch_size=20)  # max_length = 64
    with caplog.at_level("WARNING"):
        list(truncating)
    assert truncating.stats.truncated == {row_encoding.RESPONSE_TOO_LONG: 10}
    assert ("10 of 100 examples had a response longer than max_length and were truncated "
            "(too_long='truncate')") in caplog.text
