"""Reference cache: keys and digests, write/lookup across batch sizes and buckets, atomicity."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from ml_collections import ConfigDict

from mmpo_jax.data import image_processing, pipeline, shapes_world
from mmpo_jax.data.batch import shift_for_next_token
from mmpo_jax.data.tokenizer import build_word_tokenizer
from mmpo_jax.engine import reference_cache
from mmpo_jax.engine.reference_cache import ReferenceCache, open_or_build

NUM_RECORDS = 14
NUM_IMAGE_TOKENS = 4
# shapes-world records here are 18, 22 or 26 tokens long, so these buckets mix lengths per batch
BUCKETS = (20, 24, 28)
MAX_LENGTH = BUCKETS[-1]
NAMES = ("ref/chosen/token_logps", "ref/rejected/token_logps", "chosen/token_weights")


@pytest.fixture(scope="module")
def tokenizer():
    return build_word_tokenizer(shapes_world.vocabulary(), model_max_length=512)


@pytest.fixture(scope="module")
def records():
    spec = shapes_world.WorldSpec(preference_size=NUM_RECORDS)
    return list(shapes_world.generate_split(spec, "preference"))


def batches(records, tokenizer, **overrides):
    kwargs = dict(tokenizer=tokenizer, image_config=image_processing.tiny(16),
                  num_image_tokens=NUM_IMAGE_TOKENS, batch_size=4, buckets=BUCKETS, seed=0,
                  num_epochs=1, shuffle=False, shard_by_process=False)
    kwargs.update(overrides)
    return pipeline.preference_pipeline(records, **kwargs)


@jax.jit
def reference_arrays(batch):
    """A deterministic per-token function of the batch, masked like a reference's outputs."""
    out = {}
    for group in ("chosen", "rejected"):
        inputs, labels, mask = shift_for_next_token(getattr(batch, f"{group}_input_ids"),
                                                    getattr(batch, f"{group}_loss_mask"))
        position = jnp.arange(inputs.shape[1])[None, :]
        logps = -jnp.abs(jnp.sin(0.37 * labels + 0.11 * inputs + 0.05 * position)) - 0.01
        out[f"ref/{group}/token_logps"] = logps * mask
    _, labels, mask = shift_for_next_token(batch.chosen_input_ids, batch.chosen_loss_mask)
    out["chosen/token_weights"] = (labels % 7 + 1) / 7.0 * mask
    return out


class CountingCompute:
    """``reference_arrays`` plus the number of batches it was run on."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, batch):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError(f"interrupted at batch {self.calls}")
        return reference_arrays(batch)


def key(**overrides):
    parts = dict(model={"preset": "tiny", "dtype": "float32"}, data={"buckets": BUCKETS},
                 method={"name": "catpo", "alpha": 0.5}, params="0" * 64)
    parts.update(overrides)
    return reference_cache.cache_key(**parts)


def build(tmp_path, records, tokenizer, cache_key=None, compute=None, **pipeline_overrides):
    return open_or_build(tmp_path, cache_key or key(), names=NAMES, num_records=len(records),
                         max_length=MAX_LENGTH,
                         batches_fn=lambda: batches(records, tokenizer, **pipeline_overrides),
                         compute_fn=compute or CountingCompute(), progress=False)


def assert_lookup_matches(cache, batch):
    found, expected = cache.lookup(batch), jax.device_get(reference_arrays(batch))
    assert set(found) == set(NAMES)
    for name in NAMES:
        assert found[name].dtype == np.float32
        np.testing.assert_array_equal(found[name], expected[name], err_msg=name)
    padding = np.asarray(batch.example_mask) == 0
    for name in NAMES:
        assert not found[name][padding].any()


# ----------------------------------------------------------------------------- keys and digests


def test_cache_key_is_canonical_and_sensitive():
    base = key()
    assert len(base) == 64 and base == key()
    reordered = reference_cache.cache_key(
        params="0" * 64, method={"alpha": 0.5, "name": "catpo"}, data={"buckets": list(BUCKETS)},
        model=ConfigDict({"dtype": "float32", "preset": "tiny"}))
    assert reordered == base
    changed = [key(method={"name": "catpo", "alpha": 0.6}), key(params="1" + "0" * 63),
               key(model={"preset": "tiny", "dtype": "bfloat16"}), key(tokenizer="ab" * 32)]
    assert len({base, *changed}) == 5
    with pytest.raises(TypeError, match="parts.array"):
        reference_cache.cache_key(array=np.zeros(2))


def _tiny_model_state(seed):
    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Linear(4, 8, rngs=rngs)
            self.layers = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(2)])
    return nnx.state(Tiny(nnx.Rngs(seed)))


def test_params_digest_tracks_every_element():
    state = _tiny_model_state(0)
    digest = reference_cache.params_digest(state)
    assert digest == reference_cache.params_digest(state) == reference_cache.params_digest(
        _tiny_model_state(0))
    assert digest != reference_cache.params_digest(_tiny_model_state(1))
    leaves, treedef = jax.tree_util.tree_flatten(state)
    edited = list(leaves)
    edited[-1] = edited[-1].at[0, 0].add(1e-6)
    assert digest != reference_cache.params_digest(jax.tree_util.tree_unflatten(treedef, edited))
    as_bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), state)
    assert reference_cache.params_digest(as_bf16) != reference_cache.params_digest(
        jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), as_bf16))
    # a plain pytree of NumPy arrays; the same bytes under swapped names is another model
    a, b = np.arange(3, dtype=np.float32), np.ones(3, np.float32)
    assert (reference_cache.params_digest({"a": a, "b": b})
            != reference_cache.params_digest({"a": b, "b": a}))
    assert reference_cache.params_digest({"a": a}) != reference_cache.params_digest(
        {"a": a.reshape(3, 1)})


def test_tokenizer_digest(tokenizer):
    same = build_word_tokenizer(shapes_world.vocabulary(), model_max_length=512)
    other = build_word_tokenizer(shapes_world.vocabulary() + ["hexagon"], model_max_length=512)
    assert reference_cache.tokenizer_digest(tokenizer) == reference_cache.tokenizer_digest(same)
    assert reference_cache.tokenizer_digest(tokenizer) != reference_cache.tokenizer_digest(other)


# ----------------------------------------------------------------------------- write and lookup


def test_lookup_returns_compute_rows_in_any_batching(tmp_path, records, tokenizer):
    compute = CountingCompute()
    cache = build(tmp_path, records, tokenizer, compute=compute)
    assert cache.exists() and compute.calls == 4
    manifest = json.loads((cache.path / reference_cache.MANIFEST).read_text())
    assert manifest["key"] == key() and manifest["names"] == list(NAMES)
    assert manifest["shape"] == [NUM_RECORDS, MAX_LENGTH] and manifest["missing_records"] == 0

    seen_lengths, padding_rows = set(), 0
    for overrides in (dict(batch_size=3, shuffle=True, seed=7, buckets=(24, 28)),
                      dict(batch_size=5, shuffle=True, seed=3, buckets=(22, 26)),
                      dict(batch_size=4, buckets=(40,))):  # T past the cache's max_length
        for batch in batches(records, tokenizer, **overrides):
            seen_lengths.add(batch.sequence_length)
            padding_rows += int(np.sum(batch.example_mask == 0))
            assert_lookup_matches(cache, batch)
    assert {24, 26, 28, 40} <= seen_lengths and padding_rows > 0


def test_same_key_reuses_and_other_key_rebuilds(tmp_path, records, tokenizer):
    first = build(tmp_path, records, tokenizer)
    again = CountingCompute()
    assert build(tmp_path, records, tokenizer, compute=again).path == first.path
    assert again.calls == 0
    # a writer that finishes second (a concurrent build of the same key) keeps the first cache
    first.write(batches(records, tokenizer), reference_arrays, progress=False)
    assert first.exists() and [p.name for p in tmp_path.iterdir()] == [first.path.name]

    for other_key in (key(method={"name": "catpo", "alpha": 0.6}),
                      key(params=reference_cache.params_digest(_tiny_model_state(3)))):
        rebuilt = CountingCompute()
        cache = build(tmp_path, records, tokenizer, cache_key=other_key, compute=rebuilt)
        assert rebuilt.calls == 4 and cache.path != first.path and cache.exists()
    assert first.exists()  # old caches are left alone
    assert len([p for p in tmp_path.iterdir()]) == 3


def test_a_different_key_in_the_same_directory_is_never_reused(tmp_path, records, tokenizer):
    stored, asked = "0" * 16 + "a" * 48, "0" * 16 + "b" * 48  # same directory prefix
    build(tmp_path, records, tokenizer, cache_key=stored)
    impostor = ReferenceCache(tmp_path, asked, NAMES, NUM_RECORDS, MAX_LENGTH)
    assert not impostor.exists()
    with pytest.raises(FileNotFoundError):
        impostor.lookup(next(iter(batches(records, tokenizer))))
    with pytest.raises(FileExistsError, match=stored):
        build(tmp_path, records, tokenizer, cache_key=asked)
    # the same key with settings it does not cover
    with pytest.raises(ValueError, match="num_records"):
        ReferenceCache(tmp_path, stored, NAMES[:2], NUM_RECORDS, MAX_LENGTH).exists()


def test_interrupted_write_leaves_nothing_and_a_later_build_completes(tmp_path, records,
                                                                      tokenizer):
    with pytest.raises(RuntimeError, match="interrupted at batch 3"):
        build(tmp_path, records, tokenizer, compute=CountingCompute(fail_at=3))
    cache = ReferenceCache(tmp_path, key(), NAMES, NUM_RECORDS, MAX_LENGTH)
    assert not cache.exists() and list(tmp_path.iterdir()) == []
    retry = CountingCompute()
    cache = build(tmp_path, records, tokenizer, compute=retry)
    assert retry.calls == 4 and cache.exists()
    for batch in batches(records, tokenizer, batch_size=6, shuffle=True, seed=1):
        assert_lookup_matches(cache, batch)


def test_records_without_a_row(tmp_path, records, tokenizer):
    # buckets up to 24 (no truncation below 40) drop the 26-token records; they may have no row
    cache = build(tmp_path / "dropped", records, tokenizer, buckets=(20, 24), max_length=40)
    lengths = np.load(cache.path / reference_cache.LENGTHS_FILE)
    dropped = np.flatnonzero(lengths == 0)
    assert dropped.size > 0
    with pytest.raises(ValueError, match=f"records \\[{dropped[0]}"):
        for batch in batches(records, tokenizer, batch_size=NUM_RECORDS):
            cache.lookup(batch)
    # without drops, an epoch cut short is an error, not a cache with holes
    short = ReferenceCache(tmp_path / "short", key(), NAMES, NUM_RECORDS, MAX_LENGTH)
    with pytest.raises(ValueError, match="got no row"):
        short.write(list(batches(records, tokenizer))[:-1], reference_arrays, progress=False)
    assert not short.exists() and list((tmp_path / "short").iterdir()) == []


def test_changed_tokens_under_the_same_key_are_caught(tmp_path, records, tokenizer):
    cache = build(tmp_path, records, tokenizer)
    edited = list(records)
    edited[5] = dict(records[5], chosen="a red star.")
    with pytest.raises(ValueError, match=r"records \[5\].*other tokens"):
        for batch in batches(edited, tokenizer):
            cache.lookup(batch)


def test_write_checks_outputs_and_processes(tmp_path, records, tokenizer, monkeypatch):
    cache = ReferenceCache(tmp_path, key(), NAMES, NUM_RECORDS, MAX_LENGTH)
    few = list(batches(records, tokenizer))

    def missing_name(batch):
        return {k: v for k, v in reference_arrays(batch).items() if k != NAMES[2]}

    def short_rows(batch):
        return {k: v[:, :-1] for k, v in reference_arrays(batch).items()}

    with pytest.raises(ValueError, match="compute_fn returned arrays"):
        cache.write(few, missing_name, progress=False)
    with pytest.raises(ValueError, match="shape"):
        cache.write(few, short_rows, progress=False)
    with pytest.raises(ValueError, match="max_length=20"):
        ReferenceCache(tmp_path, key(), NAMES, NUM_RECORDS, 20).write(
            few, reference_arrays, progress=False)
    with pytest.raises(ValueError, match="outside"):
        ReferenceCache(tmp_path, key(), NAMES, 10, MAX_LENGTH).write(
            few, reference_arrays, progress=False)
    with pytest.raises(ValueError, match="repeats forever"):
        cache.write(batches(records, tokenizer, num_epochs=None), reference_arrays)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(NotImplementedError, match="process_count"):
        cache.write(few, reference_arrays, progress=False)
    assert list(tmp_path.iterdir()) == []
