"""Batch structures: bucket choice, right padding, masks, the next-token shift, collation."""

import jax
import numpy as np
import pytest

from mmpo_jax.data.batch import (
    Batch,
    SftBatch,
    choose_bucket,
    collate,
    pad_to_length,
    shift_for_next_token,
    validate_buckets,
)

PAD = 3


def _row(index, chosen_len, rejected_len, *, image_value=0.0):
    return {
        "pixel_values": np.full((4, 4, 3), image_value, np.float32),
        "chosen_input_ids": np.arange(10, 10 + chosen_len, dtype=np.int32),
        "chosen_loss_mask": (np.arange(chosen_len) >= 2).astype(np.int32),
        "rejected_input_ids": np.arange(50, 50 + rejected_len, dtype=np.int32),
        "rejected_loss_mask": (np.arange(rejected_len) >= 2).astype(np.int32),
        "example_index": np.int32(index),
    }


def test_choose_bucket_takes_the_smallest_that_fits():
    buckets = (8, 16, 32)
    assert [choose_bucket(n, buckets) for n in (0, 1, 8, 9, 16, 17, 32)] == [8, 8, 8, 16, 16, 32, 32]
    assert choose_bucket(33, buckets) is None


@pytest.mark.parametrize("bad", [(), (16, 8), (8, 8), (0, 8), (-4,)])
def test_validate_buckets_rejects_unordered_or_nonpositive(bad):
    with pytest.raises(ValueError, match="strictly increasing"):
        validate_buckets(bad)


def test_collate_pads_both_responses_to_one_bucket_and_masks_pad_rows():
    rows = [_row(7, 5, 9, image_value=1.0), _row(2, 6, 3, image_value=2.0), _row(-1, 4, 4)]
    batch = collate(Batch, rows, example_mask=[True, True, False], buckets=(8, 16, 32), pad_id=PAD)

    # longest sequence is 9 -> bucket 16, for chosen AND rejected
    assert batch.chosen_input_ids.shape == batch.rejected_input_ids.shape == (3, 16)
    assert batch.sequence_length == 16 and batch.batch_size == 3
    np.testing.assert_array_equal(batch.example_mask, [1, 1, 0])
    np.testing.assert_array_equal(batch.example_index, [7, 2, -1])
    # right padding with the pad id, attention 1 exactly on real tokens, loss mask 0 on padding
    np.testing.assert_array_equal(batch.rejected_input_ids[1], [50, 51, 52] + [PAD] * 13)
    np.testing.assert_array_equal(batch.rejected_attention_mask[1], [1] * 3 + [0] * 13)
    np.testing.assert_array_equal(batch.chosen_loss_mask[0], [0, 0, 1, 1, 1] + [0] * 11)
    np.testing.assert_array_equal(batch.chosen_attention_mask.sum(1), [5, 6, 4])
    # one image per example, shared by chosen and rejected
    assert batch.pixel_values.shape == (3, 4, 4, 3)
    np.testing.assert_array_equal(batch.pixel_values[:, 0, 0, 0], [1.0, 2.0, 0.0])
    for field in ("chosen_input_ids", "chosen_loss_mask", "chosen_attention_mask", "example_mask"):
        assert getattr(batch, field).dtype == np.int32, field


def test_collate_leaves_unrequested_extras_none_and_fills_given_ones():
    plain = collate(Batch, [_row(0, 3, 3)], example_mask=[True], buckets=(8,), pad_id=PAD)
    extra_names = ("corrupt_pixel_values", "noise_pixel_values", "focus_aug_pixel_values",
                   "robust_chosen_input_ids", "ddw_clip_crop", "ref_chosen_logps")
    assert all(getattr(plain, name) is None for name in extra_names)
    assert len(jax.tree_util.tree_leaves(plain)) == 9

    row = dict(_row(0, 3, 3), corrupt_pixel_values=np.ones((4, 4, 3), np.float32),
               robust_chosen_input_ids=np.arange(12, dtype=np.int32),
               robust_chosen_loss_mask=np.ones(12, np.int32), ref_chosen_logps=np.float32(-2.5))
    batch = collate(Batch, [row], example_mask=[True], buckets=(8, 16), pad_id=PAD)
    assert batch.corrupt_pixel_values.shape == (1, 4, 4, 3)
    assert batch.ref_chosen_logps.shape == (1,)
    # the robust pair's 12 tokens push the whole batch into bucket 16
    assert batch.sequence_length == 16 and batch.robust_chosen_attention_mask.sum() == 12
    assert batch.noise_pixel_values is None


def test_collate_rejects_inconsistent_rows_and_overlong_sequences():
    with pytest.raises(ValueError, match="row 1 has fields"):
        collate(Batch, [_row(0, 3, 3), dict(_row(1, 3, 3), ddw_clip_crop=np.float32(1))],
                example_mask=[True, True], buckets=(8,), pad_id=PAD)
    with pytest.raises(ValueError, match="exceeds the largest bucket 8"):
        collate(Batch, [_row(0, 9, 3)], example_mask=[True], buckets=(8,), pad_id=PAD)
    with pytest.raises(ValueError, match="SftBatch has no fields"):
        collate(SftBatch, [_row(0, 3, 3)], example_mask=[True], buckets=(8,), pad_id=PAD)


def test_sft_collate():
    rows = [{"pixel_values": np.zeros((2, 2, 3), np.float32), "input_ids": np.array([1, 4, 9, 2]),
             "loss_mask": np.array([0, 0, 1, 1]), "example_index": np.int32(i)} for i in range(2)]
    batch = collate(SftBatch, rows, example_mask=[True, False], buckets=(4, 8), pad_id=PAD)
    assert batch.input_ids.shape == (2, 4)
    np.testing.assert_array_equal(batch.attention_mask, np.ones((2, 4)))
    np.testing.assert_array_equal(batch.example_mask, [1, 0])


def test_shift_for_next_token_hand_example():
    # BOS, img, "q", ASSISTANT, r1, r2, EOS, pad
    ids = np.array([[1, 4, 20, 21, 30, 31, 2, PAD]])
    loss = np.array([[0, 0, 0, 0, 1, 1, 1, 0]])
    inputs, labels, mask = shift_for_next_token(ids, loss)
    np.testing.assert_array_equal(inputs, ids)
    np.testing.assert_array_equal(labels, [[4, 20, 21, 30, 31, 2, PAD, 0]])
    # predicted at position t is token t+1: positions 3, 4, 5 predict r1, r2, EOS
    np.testing.assert_array_equal(mask, [[0, 0, 0, 1, 1, 1, 0, 0]])
    assert np.asarray(labels)[0][np.asarray(mask)[0] == 1].tolist() == [30, 31, 2]
    jitted = jax.jit(shift_for_next_token)(ids, loss)
    for a, b in zip(jitted, (inputs, labels, mask)):
        np.testing.assert_array_equal(a, b)


def test_concatenated_responses_stacks_chosen_then_rejected():
    batch = collate(Batch, [_row(0, 3, 5), _row(1, 4, 2)], example_mask=[True, True],
                    buckets=(8,), pad_id=PAD)
    ids, loss, attention = batch.concatenated_responses()
    assert ids.shape == loss.shape == attention.shape == (4, 8)
    np.testing.assert_array_equal(ids[:2], batch.chosen_input_ids)
    np.testing.assert_array_equal(ids[2:], batch.rejected_input_ids)
    np.testing.assert_array_equal(attention[2:], batch.rejected_attention_mask)


def test_pad_to_length_equals_collating_into_the_longer_bucket():
    rows = [_row(7, 5, 9), _row(-1, 4, 4)]
    short = collate(Batch, rows, example_mask=[True, False], buckets=(16,), pad_id=PAD)
    long = collate(Batch, rows, example_mask=[True, False], buckets=(32,), pad_id=PAD)
    padded = pad_to_length(short, 32, PAD)
    for name, value in vars(long).items():
        np.testing.assert_array_equal(getattr(padded, name), value, err_msg=name)
    assert pad_to_length(short, 16, PAD) is short
    with pytest.raises(ValueError, match="length 16 to the shorter 8"):
        pad_to_length(short, 8, PAD)
