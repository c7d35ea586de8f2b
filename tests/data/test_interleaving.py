"""Two-image SFT rows and the interleaving of pipelines whose batches differ in shape."""

import json

import grain
import numpy as np
import pytest

from mmpo_jax.data import pipeline
from mmpo_jax.data.batch import SftBatch
from mmpo_jax.data.interleaving import Interleaved
from tests.data.test_pipeline import (BUCKETS, IMAGE_SIZE, NUM_IMAGE_TOKENS, image_config,
                                      make_records, tokenizer)

__all__ = ["image_config", "tokenizer"]  # fixtures


def _focus_records(n, seed=1):
    rng = np.random.default_rng(seed)
    return [{**record, "response": record["chosen"],
             "focus_image": rng.integers(0, 256, (IMAGE_SIZE // 2,) * 2 + (3,), dtype=np.uint8)}
            for record in make_records(n, seed)]


def _sft(records, tokenizer, image_config, **overrides):
    kwargs = dict(tokenizer=tokenizer, image_config=image_config, num_image_tokens=NUM_IMAGE_TOKENS,
                  batch_size=4, buckets=BUCKETS, seed=0, num_epochs=2, shard_by_process=False,
                  response_field="chosen")
    kwargs.update(overrides)
    return pipeline.sft_pipeline(records, **kwargs)


def test_two_image_rows_hold_the_image_then_the_crop(tokenizer, image_config):
    records = _focus_records(6)
    batches = list(_sft(records, tokenizer, image_config, num_epochs=1, two_images=True))
    assert len(batches) == 2 and all(isinstance(b, SftBatch) for b in batches)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    for batch in batches:
        assert batch.pixel_values.shape == (4, 2, IMAGE_SIZE, IMAGE_SIZE, 3)
        # every row, padding rows too, holds two images' placeholders: one sequence shape per image
        np.testing.assert_array_equal((batch.input_ids == image_token).sum(axis=1),
                                      2 * NUM_IMAGE_TOKENS)
        for row, index in enumerate(batch.example_index):
            if index >= 0:
                np.testing.assert_array_equal(batch.pixel_values[row, 0],
                                              image_config(records[index]["image"]))
                np.testing.assert_array_equal(batch.pixel_values[row, 1],
                                              image_config(records[index]["focus_image"]))


def test_each_part_keeps_its_share_at_every_step(tokenizer, image_config):
    main, focus = make_records(12), _focus_records(4)  # 3 and 1 batches of 4 per epoch
    it = Interleaved([_sft(main, tokenizer, image_config),
                      _sft(focus, tokenizer, image_config, two_images=True)])
    assert it.num_batches == 8
    kinds = [batch.pixel_values.ndim for batch in it]
    assert kinds == [4, 4, 5, 4, 4, 4, 5, 4]  # 3 : 1, spread out, both finish with the run
    for step in range(1, len(kinds) + 1):
        assert abs(kinds[:step].count(5) - step / 4) < 1
    assert it.stats.examples == 2 * (12 + 4)
    with pytest.raises(StopIteration):
        next(it)


def test_an_interleaved_stream_resumes_where_it_stopped(tokenizer, image_config):
    main, focus = make_records(10), _focus_records(5)

    def stream():
        return Interleaved([_sft(main, tokenizer, image_config),
                            _sft(focus, tokenizer, image_config, two_images=True)])

    full = stream()
    whole = list(full)
    first = stream()
    head = [next(first) for _ in range(4)]
    state = json.loads(json.dumps(first.get_state()))  # what a checkpoint holds
    resumed = stream()
    resumed.set_state(state)
    rest = list(resumed)
    assert len(head) + len(rest) == len(whole)
    for a, b in zip(head + rest, whole):
        assert a.pixel_values.shape == b.pixel_values.shape
        np.testing.assert_array_equal(a.example_index, b.example_index)
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
    assert resumed.stats == full.stats and full.stats.examples == 2 * (10 + 5)
    with pytest.raises(ValueError, match="holds 2 pipelines, this run interleaves 1"):
        Interleaved([_sft(main, tokenizer, image_config)]).set_state(state)


def test_every_process_takes_the_same_part_at_every_step(tokenizer, image_config):
    """Three processes' shards of uneven sources (11 and 5 records, batches of 2): the batches of
    one step stack into one global array only if every process takes the same part then, and
    together the processes read every record once per epoch."""
    main, focus = make_records(11), _focus_records(5)

    def stream(process):
        shard = dict(shard_options=grain.sharding.ShardOptions(shard_index=process, shard_count=3),
                     batch_size=2)
        return Interleaved([_sft(main, tokenizer, image_config, **shard),
                            _sft(focus, tokenizer, image_config, two_images=True, **shard)])

    runs = [list(stream(process)) for process in range(3)]
    kinds = [[batch.pixel_values.ndim for batch in run] for run in runs]
    assert kinds[0] == kinds[1] == kinds[2] and kinds[0].count(5) == 2 * 1  # 2 epochs x 1 batch
    for ndim, records in ((4, main), (5, focus)):
        read = [int(i) for run in runs for batch in run if batch.pixel_values.ndim == ndim
                for i in batch.example_index if i >= 0]
        assert sorted(read) == sorted(list(range(len(records))) * 2)
    # a process resumed from its own saved position goes on with the same parts as the others
    first = stream(1)
    head = [next(first) for _ in range(3)]
    resumed = stream(1)
    resumed.set_state(first.get_state())
    assert [b.pixel_values.ndim for b in head + list(resumed)] == kinds[0]
