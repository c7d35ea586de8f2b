import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmpo_jax.objectives.logprobs import (
    AUTO,
    CPU_CHUNK_BYTES,
    DEFAULT_CHUNK_SIZE,
    chunk_positions,
    gather_positions,
    hidden_token_logprobs,
    hidden_token_logprobs_and_kl,
    position_bucket,
    response_positions,
    scatter_positions,
    sequence_logps,
    token_kl,
    token_logprobs,
    token_logprobs_and_kl,
)


def numpy_token_logprobs(logits, labels, mask):
    logits = logits.astype(np.float64)
    out = np.zeros(labels.shape)
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1]):
            if mask[b, t]:
                row = logits[b, t]
                lse = row.max() + np.log(np.sum(np.exp(row - row.max())))
                out[b, t] = row[labels[b, t]] - lse
    return out


def numpy_token_kl(policy_logits, ref_logits, mask):
    """sum_v p_v log(p_v / q_v) in float64."""
    out = np.zeros(mask.shape)
    for b in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[b, t]:
                x = policy_logits[b, t].astype(np.float64)
                y = ref_logits[b, t].astype(np.float64)
                log_p = x - x.max() - np.log(np.sum(np.exp(x - x.max())))
                log_q = y - y.max() - np.log(np.sum(np.exp(y - y.max())))
                out[b, t] = np.sum(np.exp(log_p) * (log_p - log_q))
    return out


def _case(seed=0, batch=2, seq=11, vocab=37):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=(batch, seq, vocab)).astype(np.float32)
    labels = rng.integers(0, vocab, size=(batch, seq))
    mask = np.ones((batch, seq), bool)
    mask[0, :3] = False  # prompt
    mask[-1, -4:] = False  # padding
    return logits, labels, mask


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 4, 11, 64])
def test_token_logprobs_match_numpy_for_every_chunking(chunk_size):
    logits, labels, mask = _case()
    got = token_logprobs(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), chunk_size=chunk_size)
    assert got.dtype == jnp.float32 and got.shape == labels.shape
    np.testing.assert_allclose(got, numpy_token_logprobs(logits, labels, mask), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[~mask] == 0.0)


def test_chunked_gradient_equals_unchunked():
    logits, labels, mask = _case(1)

    def total(lg, chunk):
        return jnp.sum(token_logprobs(lg, jnp.asarray(labels), jnp.asarray(mask), chunk_size=chunk))

    g_chunk = jax.grad(total)(jnp.asarray(logits), 4)
    g_full = jax.grad(total)(jnp.asarray(logits), None)
    np.testing.assert_allclose(g_chunk, g_full, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(g_chunk)[~mask] == 0.0)


def test_masked_garbage_is_zero_with_finite_gradient():
    logits, labels, mask = _case(2)
    logits[~mask] = np.inf
    logits[0, 0, 0] = np.nan
    labels[~mask] = -100
    lg = jnp.asarray(logits)

    def total(x):
        return jnp.sum(token_logprobs(x, jnp.asarray(labels), jnp.asarray(mask), chunk_size=4))

    value, grad = jax.value_and_grad(total)(lg)
    assert np.isfinite(value)
    assert np.all(np.isfinite(np.asarray(grad)))
    clean = np.where(mask[..., None], logits, 0.0)
    np.testing.assert_allclose(value, numpy_token_logprobs(clean, np.where(mask, labels, 0), mask).sum(), rtol=1e-5)


def test_bfloat16_logits_are_computed_in_float32():
    logits, labels, mask = _case(3)
    bf = jnp.asarray(logits, jnp.bfloat16)
    got = token_logprobs(bf, jnp.asarray(labels), jnp.asarray(mask), chunk_size=4)
    assert got.dtype == jnp.float32
    expected = numpy_token_logprobs(np.asarray(bf.astype(jnp.float32)), labels, mask)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_token_kl_matches_numpy_zero_for_identical_and_positive_otherwise(chunk_size):
    logits, _, mask = _case(4)
    rng = np.random.default_rng(5)
    ref = logits + rng.normal(0.0, 1.0, size=logits.shape).astype(np.float32)
    kl = token_kl(jnp.asarray(logits), jnp.asarray(ref), jnp.asarray(mask), chunk_size=chunk_size)
    np.testing.assert_allclose(kl, numpy_token_kl(logits, ref, mask), rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(kl)[mask] > 0) and np.all(np.asarray(kl)[~mask] == 0)
    same = token_kl(jnp.asarray(logits), jnp.asarray(logits), jnp.asarray(mask), chunk_size=chunk_size)
    np.testing.assert_allclose(same, 0.0, atol=1e-6)


def test_token_kl_stays_accurate_when_policy_is_close_to_reference():
    # Large logits, tiny differences: a plain float32 sum p (log p - log q) is off by ~eps * |lse|,
    # which here is larger than the KL itself.
    rng = np.random.default_rng(10)
    policy = (rng.normal(size=(2, 5, 300)) * 10.0).astype(np.float32)
    ref = policy + (rng.normal(size=policy.shape) * 1e-3).astype(np.float32)
    mask = np.ones((2, 5), bool)
    kl = token_kl(jnp.asarray(policy), jnp.asarray(ref), jnp.asarray(mask), chunk_size=2)
    np.testing.assert_allclose(kl, numpy_token_kl(policy, ref, mask), rtol=1e-3)


def test_token_kl_gradient_matches_float64_finite_differences():
    rng = np.random.default_rng(11)
    policy = rng.normal(size=(1, 2, 9)).astype(np.float32)
    ref = rng.normal(size=(1, 2, 9)).astype(np.float32)
    mask = np.array([[True, False]])
    grad = jax.grad(lambda p: jnp.sum(token_kl(p, jnp.asarray(ref), jnp.asarray(mask))))(jnp.asarray(policy))
    step = 1e-6
    numeric = np.zeros(policy.shape)
    for v in range(9):
        bump = np.zeros(policy.shape)
        bump[0, 0, v] = step
        numeric[0, 0, v] = (
            numpy_token_kl(policy + bump, ref, mask).sum() - numpy_token_kl(policy - bump, ref, mask).sum()
        ) / (2 * step)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6)


def test_token_kl_gradient_flows_to_policy_only():
    logits, _, mask = _case(6)
    ref = jnp.asarray(logits[:, :, ::-1].copy())
    grads = jax.grad(lambda p, r: jnp.sum(token_kl(p, r, jnp.asarray(mask), chunk_size=3)), argnums=(0, 1))(
        jnp.asarray(logits), ref
    )
    assert np.any(np.asarray(grads[0]) != 0) and np.all(np.asarray(grads[1]) == 0)
    assert np.all(np.isfinite(np.asarray(grads[0])))


def test_token_kl_with_minus_inf_vocab_entries_is_finite():
    logits, _, mask = _case(7)
    logits[..., :5] = -np.inf  # e.g. banned tokens in both policy and reference
    value, grad = jax.value_and_grad(
        lambda p: jnp.sum(token_kl(p, jnp.asarray(logits) * 0.5, jnp.asarray(mask), chunk_size=4))
    )(jnp.asarray(logits))
    assert np.isfinite(value) and np.all(np.isfinite(np.asarray(grad)))


def test_sequence_logps_sum_and_mean():
    tok = jnp.array([[1.0, 2.0, 3.0, 99.0], [4.0, 0.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]])
    mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(sequence_logps(tok, mask), [6.0, 4.0, 0.0])
    np.testing.assert_allclose(sequence_logps(tok, mask, reduction="mean"), [2.0, 4.0, 0.0])
    with pytest.raises(ValueError, match="'median'"):
        sequence_logps(tok, mask, reduction="median")


def test_padding_never_changes_sequence_logps():
    logits, labels, mask = _case(8, batch=1, seq=6)
    base = sequence_logps(token_logprobs(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask)), mask)
    rng = np.random.default_rng(0)
    padded_logits = np.concatenate([logits, rng.normal(size=(1, 5, logits.shape[-1])).astype(np.float32)], 1)
    padded_labels = np.concatenate([labels, np.full((1, 5), -100)], 1)
    padded_mask = np.concatenate([mask, np.zeros((1, 5), bool)], 1)
    padded = sequence_logps(
        token_logprobs(jnp.asarray(padded_logits), jnp.asarray(padded_labels), jnp.asarray(padded_mask), chunk_size=4),
        padded_mask,
    )
    np.testing.assert_allclose(padded, base, rtol=1e-6)


def test_jit_equals_eager_and_shape_errors():
    logits, labels, mask = _case(9)
    args = (jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    np.testing.assert_allclose(
        jax.jit(lambda *a: token_logprobs(*a, chunk_size=4))(*args), token_logprobs(*args, chunk_size=4), rtol=1e-6
    )
    with pytest.raises(ValueError, match=r"\(2, 10\)"):
        token_logprobs(args[0], args[1][:, :10], args[2])
    with pytest.raises(ValueError, match="chunk_size=0"):
        token_logprobs(*args, chunk_size=0)


def test_chunking_keeps_scratch_memory_at_chunk_size():
    batch, seq, vocab, chunk = 2, 256, 2048, 32
    logits = jax.ShapeDtypeStruct((batch, seq, vocab), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, seq), jnp.bool_)
    full_copy = batch * seq * vocab * 4

    def scratch(fn, *args):
        return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes

    chunked = scratch(lambda a, b, c: token_logprobs(a, b, c, chunk_size=chunk), logits, labels, mask)
    unchunked = scratch(lambda a, b, c: token_logprobs(a, b, c, chunk_size=None), logits, labels, mask)
    kl = scratch(lambda a, r, c: token_kl(a, r, c, chunk_size=chunk), logits, logits, mask)
    assert unchunked >= full_copy  # the check can fail: without chunks a full copy appears
    assert chunked <= 4 * full_copy * chunk // seq
    assert kl <= 8 * full_copy * chunk // seq


# --- gathered positions, from hidden states ---------------------------------------------------


def test_response_positions_bucket_gather_and_scatter():
    mask = np.array([[0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]], bool)
    positions, valid = response_positions(jnp.asarray(mask), 4)
    np.testing.assert_array_equal(positions, [[1, 2, 4, 0], [5, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(valid, [[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    jitted = jax.jit(response_positions, static_argnums=1)(jnp.asarray(mask), 4)
    np.testing.assert_array_equal(jitted[0], positions)
    values = np.arange(18, dtype=np.float32).reshape(3, 6) + 1
    gathered = gather_positions(jnp.asarray(values), positions)
    np.testing.assert_array_equal(gathered, np.take_along_axis(values, np.asarray(positions), axis=1))
    np.testing.assert_array_equal(scatter_positions(gathered, positions, valid, 6), np.where(mask, values, 0))
    assert gather_positions(jnp.zeros((3, 6, 5)), positions).shape == (3, 4, 5)
    assert position_bucket(mask, (1, 2, 8)) == 8 and position_bucket(mask, (3, 4)) == 3
    with pytest.raises(ValueError, match="num_positions=2 is less than a row's 3"):
        response_positions(jnp.asarray(mask), 2)
    with pytest.raises(ValueError, match="more than the largest bucket 2"):
        position_bucket(mask, (1, 2))


def _hidden_case(seed=0, batch=2, seq=9, dim=6, vocab=23):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(batch, seq, dim)).astype(np.float32)
    head = rng.normal(0.0, 0.8, size=(dim, vocab)).astype(np.float32)
    labels = rng.integers(0, vocab, size=(batch, seq))
    mask = np.ones((batch, seq), bool)
    mask[0, :2] = False
    mask[1, -3:] = False
    return hidden, head, labels, mask


@pytest.mark.parametrize("chunk_size", [None, 2, 4, 9])
def test_hidden_logprobs_and_kl_equal_the_full_logits_path(chunk_size):
    hidden, head, labels, mask = _hidden_case()
    ref_hidden = hidden + np.random.default_rng(1).normal(0.0, 0.3, size=hidden.shape).astype(np.float32)
    ref_head = head * 1.1
    args = [jnp.asarray(a) for a in (hidden, head, labels, mask)]
    policy_logits, ref_logits = hidden @ head, ref_hidden @ ref_head
    expected_logps = token_logprobs(jnp.asarray(policy_logits), args[2], args[3], chunk_size=None)
    got = hidden_token_logprobs(*args, chunk_size=chunk_size)
    np.testing.assert_allclose(got, expected_logps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, numpy_token_logprobs(policy_logits, labels, mask), rtol=1e-5, atol=1e-5)
    logps, ref_logps, kl = hidden_token_logprobs_and_kl(
        args[0], args[1], jnp.asarray(ref_hidden), jnp.asarray(ref_head), args[2], args[3], chunk_size=chunk_size)
    np.testing.assert_allclose(logps, expected_logps, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref_logps, numpy_token_logprobs(ref_logits, labels, mask), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kl, numpy_token_kl(policy_logits, ref_logits, mask), rtol=1e-4, atol=1e-6)
    for value in (logps, ref_logps, kl):
        assert value.dtype == jnp.float32 and np.all(np.asarray(value)[~mask] == 0)


def test_hidden_path_gradients_equal_the_full_logits_path_and_skip_the_reference():
    hidden, head, labels, mask = _hidden_case(2)
    ref_hidden, ref_head = hidden[::-1].copy(), head + 0.1
    labels_j, mask_j = jnp.asarray(labels), jnp.asarray(mask)

    def gathered(h, w, rh, rw):
        logps, ref_logps, kl = hidden_token_logprobs_and_kl(h, w, rh, rw, labels_j, mask_j, chunk_size=4)
        return jnp.sum(logps * 1.3 - ref_logps) + jnp.sum(kl * 0.7)

    def full(h, w, rh, rw):
        logits, ref_logits = jnp.einsum("btd,dv->btv", h, w), jnp.einsum("btd,dv->btv", rh, rw)
        logps = token_logprobs(logits, labels_j, mask_j, chunk_size=None)
        ref_logps = token_logprobs(jax.lax.stop_gradient(ref_logits), labels_j, mask_j, chunk_size=None)
        return jnp.sum(logps * 1.3 - ref_logps) + jnp.sum(token_kl(logits, ref_logits, mask_j, chunk_size=None) * 0.7)

    args = [jnp.asarray(a) for a in (hidden, head, ref_hidden, ref_head)]
    grads = jax.grad(gathered, argnums=(0, 1, 2, 3))(*args)
    expected = jax.grad(full, argnums=(0, 1, 2, 3))(*args)
    for got, want in zip(grads[:2], expected[:2]):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(grads[2])) and not np.any(np.asarray(grads[3]))


def test_padding_slots_never_change_gathered_results():
    """Whatever a padding slot holds (a repeated position's state, garbage), results and gradients are unchanged."""
    hidden, head, labels, mask = _hidden_case(3)
    garbage = hidden.copy()
    garbage[~mask] = 1e4
    labels_garbage = np.where(mask, labels, -100)

    def total(h, lab):
        return jnp.sum(hidden_token_logprobs(h, jnp.asarray(head), lab, jnp.asarray(mask), chunk_size=4))

    value, grad = jax.value_and_grad(total)(jnp.asarray(hidden), jnp.asarray(labels))
    value_g, grad_g = jax.value_and_grad(total)(jnp.asarray(garbage), jnp.asarray(labels_garbage))
    np.testing.assert_allclose(value_g, value, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad_g)[mask], np.asarray(grad)[mask], rtol=1e-6)
    assert np.all(np.asarray(grad_g)[~mask] == 0)


def test_hidden_path_scratch_memory_stays_at_chunk_size():
    """The [B, P, V] logits never exist whole: forward and backward scratch scale with the chunk."""
    batch, seq, dim, vocab, chunk = 2, 256, 16, 2048, 32
    hidden = jax.ShapeDtypeStruct((batch, seq, dim), jnp.float32)
    head = jax.ShapeDtypeStruct((dim, vocab), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, seq), jnp.bool_)
    full_logits = batch * seq * vocab * 4

    def scratch(chunk_size):
        def loss(h, w, lab, m):
            return jnp.sum(hidden_token_logprobs(h, w, lab, m, chunk_size=chunk_size))
        grad = jax.grad(loss, argnums=(0, 1))
        return jax.jit(grad).lower(hidden, head, labels, mask).compile().memory_analysis().temp_size_in_bytes

    assert scratch(None) >= full_logits  # the check can fail: unchunked, the logits are whole
    # A few chunk-sized [B, c, V] buffers (logits, their softmax and gradient), whatever the length.
    assert scratch(chunk) <= 5 * full_logits * chunk // seq


def test_hidden_path_shape_errors():
    hidden, head, labels, mask = _hidden_case()
    with pytest.raises(ValueError, match=r"lm_head \(7, 23\) \[D, V\]"):
        hidden_token_logprobs(jnp.asarray(hidden), jnp.zeros((7, 23)), jnp.asarray(labels), jnp.asarray(mask))
    with pytest.raises(ValueError, match=r"must share \[B, P\]"):
        hidden_token_logprobs(jnp.asarray(hidden), jnp.asarray(head), jnp.asarray(labels)[:, :3], jnp.asarray(mask))


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_logprobs_and_kl_in_one_pass_equal_the_separate_functions(chunk_size):
    logits, labels, mask = _case(11)
    ref = logits + np.random.default_rng(12).normal(0.0, 0.5, size=logits.shape).astype(np.float32)
    args = (jnp.asarray(labels), jnp.asarray(mask))

    def combined(p, r):
        logps, ref_logps, kl = token_logprobs_and_kl(p, r, *args, chunk_size=chunk_size)
        return jnp.sum(logps - ref_logps + 0.5 * kl), (logps, ref_logps, kl)

    def separate(p, r):
        logps = token_logprobs(p, *args, chunk_size=chunk_size)
        ref_logps = token_logprobs(jax.lax.stop_gradient(r), *args, chunk_size=chunk_size)
        kl = token_kl(p, r, args[1], chunk_size=chunk_size)
        return jnp.sum(logps - ref_logps + 0.5 * kl), (logps, ref_logps, kl)

    (_, got), grads = jax.value_and_grad(combined, argnums=(0, 1), has_aux=True)(jnp.asarray(logits), jnp.asarray(ref))
    (_, want), expected = jax.value_and_grad(separate, argnums=(0, 1), has_aux=True)(jnp.asarray(logits),
                                                                                     jnp.asarray(ref))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grads[0], expected[0], rtol=1e-5, atol=1e-7)
    assert not np.any(np.asarray(grads[1]))
    np.testing.assert_allclose(got[1], numpy_token_logprobs(ref, labels, mask), rtol=1e-5, atol=1e-5)


def test_auto_chunks_hold_a_cache_sized_slice_of_logits_on_cpu_and_change_no_value():
    assert jax.default_backend() == "cpu"
    assert chunk_positions(AUTO, 8, 32000) == CPU_CHUNK_BYTES // (4 * 8 * 32000) == 2
    assert chunk_positions(AUTO, 64, 128000) == 1  # one position even past the budget
    assert chunk_positions(AUTO, 1, 16) == CPU_CHUNK_BYTES // 64
    assert chunk_positions(7, 8, 32000) == 7 and chunk_positions(None, 8, 32000) is None
    assert DEFAULT_CHUNK_SIZE == 128  # what the hidden-state functions and other backends use
    logits, labels, mask = _case(13, vocab=2**15)  # auto: 8 positions per chunk of 11, and a tail
    assert chunk_positions(AUTO, 2, 2**15) == 8
    ref = logits + np.random.default_rng(14).normal(0.0, 0.5, size=logits.shape).astype(np.float32)
    args = (jnp.asarray(labels), jnp.asarray(mask))
    auto = token_logprobs_and_kl(jnp.asarray(logits), jnp.asarray(ref), *args)
    whole = token_logprobs_and_kl(jnp.asarray(logits), jnp.asarray(ref), *args, chunk_size=None)
    for a, b in zip(auto, whole):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
