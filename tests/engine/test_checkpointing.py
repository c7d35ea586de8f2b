"""orbax checkpoints of a training run: round trip, interval and keep-N, resume, crash safety,
sharded restore, export to the transformers layout."""

import functools
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint._src.path import atomicity

from mmpo_jax.data import image_processing, pipeline
from mmpo_jax.data.tokenizer import build_word_tokenizer, load_tokenizer
from mmpo_jax.models import convert
from mmpo_jax.models.partitioning import logical
from mmpo_jax.engine import sharding
from mmpo_jax.engine.checkpointing import Checkpointer, abstract_target, export_policy
from tests.models import hf_fixtures
from tests.data.test_pipeline import BUCKETS, IMAGE_SIZE, NUM_IMAGE_TOKENS, WORDS, make_records

TMP_SUFFIX = atomicity.TMP_DIR_SUFFIX  # ".orbax-checkpoint-tmp" in orbax-checkpoint 0.12.8


class _Tiny(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(16, 32, kernel_init=logical(init, ("embed", "mlp")), rngs=rngs)
        self.down = nnx.Linear(32, 16, kernel_init=logical(init, ("mlp", "embed")), rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.up(x)))


TX = optax.adamw(1e-2)
INPUTS = jnp.linspace(-1, 1, 4 * 16).reshape(4, 16)


@functools.partial(jax.jit, static_argnums=0)
def _adamw_step(graphdef, params, opt_state):
    def loss(params):
        return jnp.mean(nnx.merge(graphdef, params)(INPUTS) ** 2)
    updates, opt_state = TX.update(jax.grad(loss)(params), opt_state, params)
    return optax.apply_updates(params, updates), opt_state


@functools.lru_cache(maxsize=None)
def _trained(seed: int, steps: int):
    """(model, params, opt_state) after `steps` AdamW steps, so every moment is non-trivial.

    Cached: callers must not modify what they get.
    """
    model = _Tiny(rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    opt_state = TX.init(params)
    for _ in range(steps):
        params, opt_state = _adamw_step(nnx.graphdef(model), params, opt_state)
    nnx.update(model, params)
    return model, params, opt_state


def _abstract():
    """Restore targets built without allocating a model (what a resumed run does)."""
    params = nnx.state(nnx.eval_shape(lambda: _Tiny(rngs=nnx.Rngs(0))), nnx.Param)
    return abstract_target(params), abstract_target(jax.eval_shape(TX.init, params))


def _assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    jax.tree.map(np.testing.assert_array_equal, actual, expected)


def _save(checkpointer, step, seed=0, **kwargs):
    _, params, opt_state = _trained(seed, steps=1)
    kwargs.setdefault("rng", jax.random.key(step))
    return checkpointer.save(step, params=params, opt_state=opt_state, **kwargs)


@pytest.fixture(scope="module")
def make_iterator():
    tokenizer = build_word_tokenizer(WORDS, model_max_length=512)
    image_config = image_processing.tiny(IMAGE_SIZE)
    records = make_records(10)

    def make():
        return pipeline.preference_pipeline(
            records, tokenizer=tokenizer, image_config=image_config,
            num_image_tokens=NUM_IMAGE_TOKENS, batch_size=4, buckets=BUCKETS, seed=5,
            num_epochs=3, shard_by_process=False)
    return make


def test_round_trip_of_model_optimizer_rng_data_position_and_metadata(tmp_path, make_iterator):
    model, params, opt_state = _trained(seed=0, steps=3)
    iterator = make_iterator()
    for _ in range(4):  # past the first epoch's 3 batches
        next(iterator)
    rng = jax.random.fold_in(jax.random.key(7), 3)
    metadata = {"config": {"method": {"name": "dpo", "beta": 0.1}}, "note": "é"}
    with Checkpointer(tmp_path, save_every=4, keep=3) as checkpointer:
        assert checkpointer.save(4, params=params, opt_state=opt_state, rng=rng,
                                 data_iterator=iterator, metadata=metadata)
    stats_at_save = iterator.stats
    following = [next(iterator) for _ in range(3)]

    abstract_params, abstract_opt_state = _abstract()
    resumed_iterator = make_iterator()
    with Checkpointer(tmp_path, save_every=4, keep=3) as checkpointer:
        restored = checkpointer.restore(abstract_params=abstract_params,
                                        abstract_opt_state=abstract_opt_state,
                                        data_iterator=resumed_iterator)
    assert restored.step == 4 and restored.metadata == metadata
    _assert_trees_equal(restored.params, params)
    _assert_trees_equal(restored.opt_state, opt_state)
    assert int(restored.opt_state[0].count) == 3
    assert restored.rng.dtype == rng.dtype
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(rng))
    assert resumed_iterator.stats == stats_at_save
    for batch, expected in zip([next(resumed_iterator) for _ in range(3)], following):
        jax.tree.map(np.testing.assert_array_equal, batch, expected)
    # the restored state drives the model exactly as the saved one did
    fresh = _Tiny(rngs=nnx.Rngs(1))
    nnx.update(fresh, restored.params)
    x = jnp.ones((2, 16))
    np.testing.assert_array_equal(fresh(x), model(x))


@pytest.mark.parametrize("make_key", [
    lambda: jax.random.key(3),
    lambda: jax.random.key(3, impl="rbg"),
    lambda: jax.random.PRNGKey(3),
], ids=["typed_threefry", "typed_rbg", "raw_uint32"])
def test_rng_comes_back_in_the_form_it_was_saved(tmp_path, make_key):
    rng = make_key()
    with Checkpointer(tmp_path, save_every=1) as checkpointer:
        _save(checkpointer, 1, rng=rng)
        restored = checkpointer.restore(1, abstract_params=_abstract()[0],
                                        abstract_opt_state=_abstract()[1])
    assert restored.rng.dtype == rng.dtype and restored.rng.shape == rng.shape
    # same key -> same random numbers, whatever the key's form
    np.testing.assert_array_equal(jax.random.uniform(restored.rng, (4,)),
                                  jax.random.uniform(rng, (4,)))


def _step_directories(directory):
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def test_keep_deletes_the_oldest_checkpoints(tmp_path):
    with Checkpointer(tmp_path, save_every=1, keep=2) as checkpointer:
        for step in range(1, 6):
            assert _save(checkpointer, step)
        assert checkpointer.all_steps() == [4, 5]
    assert _step_directories(tmp_path) == [4, 5]


def test_save_every_skips_other_steps_unless_forced(tmp_path):
    with Checkpointer(tmp_path, save_every=3) as checkpointer:
        decisions = {step: checkpointer.should_save(step) for step in range(1, 8)}
        written = {step: _save(checkpointer, step) for step in range(1, 8)}
        assert written == decisions == {1: False, 2: False, 3: True, 4: False, 5: False,
                                        6: True, 7: False}
        assert _save(checkpointer, 7, force=True)  # the end of the run
        assert not _save(checkpointer, 7, force=True)  # already there: not an error
        assert checkpointer.all_steps() == [3, 6, 7]
    assert _step_directories(tmp_path) == [3, 6, 7]


def test_resume_picks_the_latest_and_any_saved_step_on_request(tmp_path):
    saved = {}
    with Checkpointer(tmp_path, save_every=2) as checkpointer:
        assert checkpointer.latest_step() is None
        for step in (2, 4, 6):
            _, saved[step], _ = _trained(seed=step, steps=1)
            _save(checkpointer, step, seed=step, metadata={"config": {"seed": step}})
    abstract_params, abstract_opt_state = _abstract()
    with Checkpointer(tmp_path, save_every=2) as checkpointer:  # a new process
        assert checkpointer.latest_step() == 6
        assert checkpointer.metadata() == {"config": {"seed": 6}}
        assert checkpointer.metadata(4) == {"config": {"seed": 4}}
        latest = checkpointer.restore(abstract_params=abstract_params,
                                      abstract_opt_state=abstract_opt_state)
        earlier = checkpointer.restore(2, abstract_params=abstract_params,
                                       abstract_opt_state=abstract_opt_state)
        with pytest.raises(ValueError, match=r"no checkpoint of step 5 .*\[2, 4, 6\]"):
            checkpointer.restore(5, abstract_params=abstract_params,
                                 abstract_opt_state=abstract_opt_state)
    assert latest.step == 6 and earlier.step == 2
    _assert_trees_equal(latest.params, saved[6])
    _assert_trees_equal(earlier.params, saved[2])
    np.testing.assert_array_equal(jax.random.key_data(latest.rng),
                                  jax.random.key_data(jax.random.key(6)))


def test_restore_from_an_empty_directory_says_where_it_looked(tmp_path):
    with Checkpointer(tmp_path / "run", save_every=1) as checkpointer:
        with pytest.raises(FileNotFoundError, match="no complete checkpoint in .*run"):
            checkpointer.restore(abstract_params=_abstract()[0],
                                 abstract_opt_state=_abstract()[1])


def _crash_before_commit(tmp_path, monkeypatch):
    """A save whose data is written but which dies before orbax's commit (the rename)."""

    async def killed(self):
        raise SystemExit(f"killed while committing {self.get()}")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", killed)
    with Checkpointer(tmp_path, save_every=2) as checkpointer:
        with pytest.raises(SystemExit, match="killed while committing"):
            _save(checkpointer, 4, seed=4)
    monkeypatch.undo()


def _killed_mid_write(tmp_path, monkeypatch):
    """What a process killed while orbax writes leaves: an uncommitted temporary step directory
    (here a copy of step 2's files under step 4's temporary name, with one file cut short)."""
    del monkeypatch
    partial = tmp_path / f"4{TMP_SUFFIX}"
    shutil.copytree(tmp_path / "2", partial)
    (partial / "commit_success.txt").unlink()
    for path in sorted((partial / "params").rglob("*")):
        if path.is_file() and path.stat().st_size > 8:
            path.write_bytes(path.read_bytes()[:8])
            break


@pytest.mark.parametrize("interrupt", [_crash_before_commit, _killed_mid_write],
                         ids=["crash_before_commit", "killed_mid_write"])
def test_an_interrupted_save_never_replaces_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                     interrupt):
    with Checkpointer(tmp_path, save_every=2) as checkpointer:
        _save(checkpointer, 2, seed=2)
    _, good, _ = _trained(seed=2, steps=1)

    interrupt(tmp_path, monkeypatch)
    assert (tmp_path / f"4{TMP_SUFFIX}").is_dir() and not (tmp_path / "4").exists()

    abstract_params, abstract_opt_state = _abstract()
    with Checkpointer(tmp_path, save_every=2) as checkpointer:  # the restarted run
        assert checkpointer.latest_step() == 2 and checkpointer.all_steps() == [2]
        restored = checkpointer.restore(abstract_params=abstract_params,
                                        abstract_opt_state=abstract_opt_state)
        assert restored.step == 2
        _assert_trees_equal(restored.params, good)
        # the debris of the interrupted write is gone before the restarted run's first save ...
        assert _save(checkpointer, 3, force=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "3"]
        # ... and it saves step 4 when it gets there again
        assert _save(checkpointer, 4, seed=40)
        assert checkpointer.all_steps() == [2, 3, 4]
    with Checkpointer(tmp_path, save_every=2) as checkpointer:
        again = checkpointer.restore(abstract_params=abstract_params,
                                     abstract_opt_state=abstract_opt_state)
    assert again.step == 4
    _assert_trees_equal(again.params, _trained(seed=40, steps=1)[1])


def test_restore_places_arrays_as_the_abstract_target_says(tmp_path):
    _, params, opt_state = _trained(seed=0, steps=2)  # saved from one device
    with Checkpointer(tmp_path, save_every=1) as checkpointer:
        _save(checkpointer, 1)
        checkpointer.save(2, params=params, opt_state=opt_state, rng=jax.random.key(0))

    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    abstract_params, abstract_opt_state = _abstract()
    param_shardings = sharding.state_shardings(abstract_params, mesh)
    replicated = NamedSharding(mesh, P())
    opt_shardings = jax.tree.map(lambda _: replicated, abstract_opt_state)
    # AdamW's moments are laid out like the parameters they follow
    opt_shardings = (opt_shardings[0]._replace(mu=param_shardings, nu=param_shardings),
                     *opt_shardings[1:])
    with Checkpointer(tmp_path, save_every=1) as checkpointer:
        restored = checkpointer.restore(
            abstract_params=abstract_target(abstract_params, param_shardings),
            abstract_opt_state=abstract_target(abstract_opt_state, opt_shardings))
    kernel = restored.params["up"]["kernel"].get_value()
    assert kernel.sharding == NamedSharding(mesh, P("fsdp", "tensor"))
    assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (4, 16)
    assert restored.params["down"]["kernel"].get_value().sharding.spec == P("tensor", "fsdp")
    assert restored.opt_state[0].mu["up"]["kernel"].get_value().sharding.spec == P("fsdp", "tensor")
    assert restored.opt_state[0].count.sharding == replicated
    _assert_trees_equal(restored.params, params)
    _assert_trees_equal(restored.opt_state, opt_state)


def test_async_save_round_trip(tmp_path, make_iterator):
    _, params, opt_state = _trained(seed=3, steps=2)
    iterator = make_iterator()
    next(iterator)
    with Checkpointer(tmp_path, save_every=1, async_save=True) as checkpointer:
        assert checkpointer.save(1, params=params, opt_state=opt_state, rng=jax.random.key(1),
                                 data_iterator=iterator)
        expected = next(iterator)  # the run goes on while the write finishes
        restored_iterator = make_iterator()
        restored = checkpointer.restore(abstract_params=_abstract()[0],
                                        abstract_opt_state=_abstract()[1],
                                        data_iterator=restored_iterator)
    _assert_trees_equal(restored.params, params)
    jax.tree.map(np.testing.assert_array_equal, next(restored_iterator), expected)


def test_argument_errors_name_the_bad_value(tmp_path, make_iterator):
    with pytest.raises(ValueError, match="save_every must be an integer >= 1, got 0"):
        Checkpointer(tmp_path, save_every=0)
    with pytest.raises(ValueError, match="keep must be >= 1 or None.*got 0"):
        Checkpointer(tmp_path, save_every=1, keep=0)
    with Checkpointer(tmp_path, save_every=1) as checkpointer:
        with pytest.raises(TypeError, match="JSON-serialisable.*ndarray"):
            _save(checkpointer, 1, metadata={"bad": np.zeros(2)})
        with pytest.raises(TypeError, match="got an array of dtype float32"):
            _save(checkpointer, 1, rng=jnp.zeros(2))
        assert checkpointer.all_steps() == []
        _save(checkpointer, 1)
        with pytest.raises(ValueError, match="saved without a data iterator"):
            checkpointer.restore(abstract_params=_abstract()[0],
                                 abstract_opt_state=_abstract()[1],
                                 data_iterator=make_iterator())
        wider = nnx.state(nnx.eval_shape(lambda: _Tiny(rngs=nnx.Rngs(0))), nnx.Param)
        wider["up"]["kernel"].set_value(jax.ShapeDtypeStruct((16, 48), jnp.float32))
        del wider["down"]["bias"]
        with pytest.raises(ValueError, match=r"abstract params does not match .* step 1 .*"
                           r"down/bias/value of the checkpoint is not in the target; "
                           r"up/kernel/value has shape \(16, 32\) in the checkpoint, "
                           r"\(16, 48\) in the target"):
            checkpointer.restore(abstract_params=wider, abstract_opt_state=_abstract()[1])


def test_export_policy_writes_a_complete_llava_hf_directory(tmp_path):
    source = tmp_path / "source"
    hf_fixtures.save_tiny_llava_hf(source)
    model, config = convert.load_hf_llava(source)
    tokenizer = load_tokenizer(source)
    image_config = image_processing.from_pretrained_dir(source, image_aspect_ratio="pad")
    (tmp_path / "policy.partial").mkdir()  # debris of an earlier interrupted export
    files = dict(tokenizer=tokenizer, image_config=image_config, template="llava_1_5")
    path = export_policy(model, tmp_path / "policy", **files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy", "source"]
    loaded, loaded_config = convert.load_hf_llava(path)
    assert loaded_config == config
    _assert_trees_equal(nnx.state(loaded, nnx.Param), nnx.state(model, nnx.Param))
    assert image_processing.from_pretrained_dir(path) == image_config  # padding recorded
    assert load_tokenizer(path).get_vocab() == tokenizer.get_vocab()
    assert (path / "chat_template.jinja").is_file() and (path / "generation_config.json").is_file()
    with pytest.raises(FileExistsError, match="policy already exists"):
        export_policy(model, path, **files)
