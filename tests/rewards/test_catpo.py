import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmpo_jax.rewards.catpo import (
    global_relevance,
    layer_band,
    local_relevance,
    minmax_normalize,
    semantic_relevance,
    token_weights,
)

EPS = 1e-8


def numpy_token_weights(attn, emb, vis, mask, chosen, alpha, lambda_ref, normalize, special, top_k):
    """METHODS.md §3 token rewards, transcribed with loops from the spec text."""
    batch, seq, n_img = attn.shape
    out = np.zeros((batch, seq))
    for b in range(batch):
        signals = {"g": {}, "l": {}, "s": {}}
        scored = [t for t in range(seq) if mask[b, t] and not special[b, t]]
        for t in scored:
            a = attn[b, t].astype(np.float64)
            signals["g"][t] = a.sum()
            p = a / (a.sum() + EPS)
            h = -sum(p[j] * math.log(p[j] + EPS) for j in range(n_img))
            signals["l"][t] = 1 - h / math.log(n_img)
            v_c = sum(p[j] * vis[b, j].astype(np.float64) for j in range(n_img))
            e = emb[b, t].astype(np.float64)
            cos = e @ v_c / max(np.linalg.norm(e) * np.linalg.norm(v_c), EPS)
            signals["s"][t] = (1 + cos) / 2
        if normalize == "minmax" and scored:
            for name, values in signals.items():
                lo, hi = min(values.values()), max(values.values())
                for t in values:
                    values[t] = 0.5 if hi - lo <= EPS else (values[t] - lo) / (hi - lo)
        fused = {
            t: alpha * (0.5 * signals["g"][t] + 0.5 * signals["l"][t]) + (1 - alpha) * signals["s"][t]
            for t in scored
        }
        keep = set(scored)
        if top_k is not None:
            count = math.ceil(top_k / 100 * len(scored))
            keep = set(sorted(scored, key=lambda t: (-fused[t], t))[:count])
        for t in range(seq):
            if not mask[b, t]:
                out[b, t] = 0.0
            elif special[b, t] or t not in keep:
                out[b, t] = 1.0
            else:
                tt = math.tanh(fused[t])
                out[b, t] = lambda_ref + tt if chosen else lambda_ref + (1 - tt)
    return out


def _case(seed=0, batch=2, seq=8, n_img=6, dim=16):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2, size=(batch, seq, n_img + 5))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    attn = probs[..., :n_img].astype(np.float32)  # image slice of a softmax over all keys
    emb = rng.normal(size=(batch, seq, dim)).astype(np.float32)
    vis = rng.normal(size=(batch, n_img, dim)).astype(np.float32)
    mask = np.ones((batch, seq), bool)
    mask[0, :2] = False
    mask[1, 6:] = False
    special = np.zeros((batch, seq), bool)
    special[0, 7] = True  # EOS
    return attn, emb, vis, mask, special


@pytest.mark.parametrize(
    "chosen,alpha,normalize,top_k",
    [(True, 0.5, "minmax", None), (False, 0.5, "minmax", None), (True, 0.3, "none", None),
     (False, 1.0, "minmax", 40.0), (True, 0.0, "none", 50.0)],
)
def test_matches_numpy_transcription(chosen, alpha, normalize, top_k):
    attn, emb, vis, mask, special = _case()
    got = token_weights(
        attn, emb, vis, mask, chosen=chosen, alpha=alpha, lambda_ref=0.4, normalize=normalize,
        special_token_mask=special, top_k_percent=top_k,
    )
    expected = numpy_token_weights(attn, emb, vis, mask, chosen, alpha, 0.4, normalize, special, top_k)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_uniform_attention_has_zero_local_and_one_hot_has_one():
    uniform = jnp.full((1, 2, 5), 0.1)
    np.testing.assert_allclose(local_relevance(uniform), 0.0, atol=1e-6)
    one_hot = jnp.zeros((1, 2, 5)).at[:, :, 3].set(0.7)
    np.testing.assert_allclose(local_relevance(one_hot), 1.0, atol=1e-6)
    np.testing.assert_allclose(global_relevance(one_hot), 0.7, rtol=1e-6)


def test_semantic_relevance_hand_case():
    attn = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
    vis = jnp.array([[[1.0, 0.0], [0.0, 2.0]]])
    emb = jnp.array([[[3.0, 0.0], [0.0, -1.0]]])
    np.testing.assert_allclose(semantic_relevance(attn, emb, vis), [[1.0, 0.0]], atol=1e-6)


def test_chosen_and_rejected_weights_mirror_each_other():
    attn, emb, vis, mask, _ = _case(1)
    w_c = token_weights(attn, emb, vis, mask, chosen=True, lambda_ref=0.3)
    w_r = token_weights(attn, emb, vis, mask, chosen=False, lambda_ref=0.3)
    np.testing.assert_allclose(np.asarray(w_c + w_r)[mask], 2 * 0.3 + 1, rtol=1e-6)


def test_masks_special_tokens_and_top_k():
    attn, emb, vis, mask, special = _case(2)
    w = np.asarray(token_weights(attn, emb, vis, mask, chosen=True, special_token_mask=special))
    assert np.all(w[~mask] == 0.0) and w[0, 7] == 1.0
    assert np.all((w[mask & ~special] >= 0.5) & (w[mask & ~special] <= 0.5 + math.tanh(1.0) + 1e-6))
    top = np.asarray(token_weights(attn, emb, vis, mask, chosen=True, top_k_percent=25.0))
    # row 1 has 6 valid tokens: ceil(1.5) = 2 keep their weight, 4 get 1.0
    assert np.sum(top[1, :6] != 1.0) == 2 and np.sum(top[1, :6] == 1.0) == 4


def test_minmax_constant_row_is_half_and_empty_row_is_zero():
    signal = jnp.array([[0.3, 0.3, 0.3], [1.0, 2.0, 9.0]])
    mask = jnp.array([[1, 1, 0], [0, 0, 0]])
    np.testing.assert_allclose(minmax_normalize(signal, mask), [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])


def test_zero_attention_one_token_and_all_masked_rows_are_finite():
    attn, emb, vis, mask, _ = _case(3)
    attn[0] = 0.0  # no attention to the image at all
    mask[1] = False
    mask[1, 2] = True  # one-token response
    for normalize in ("minmax", "none"):
        w = np.asarray(token_weights(attn, emb, vis, mask, chosen=False, normalize=normalize))
        assert np.all(np.isfinite(w))
    w = np.asarray(token_weights(attn, emb, vis, np.zeros_like(mask), chosen=True))
    assert np.all(w == 0.0)


def test_padding_never_changes_weights():
    attn, emb, vis, mask, special = _case(4)
    base = token_weights(attn, emb, vis, mask, chosen=True, special_token_mask=special, top_k_percent=60.0)
    pad = lambda a, v: np.concatenate([a, np.full((a.shape[0], 3) + a.shape[2:], v, a.dtype)], 1)
    padded = token_weights(
        pad(attn, np.nan), pad(emb, np.inf), vis, pad(mask, False), chosen=True,
        special_token_mask=pad(special, True), top_k_percent=60.0,
    )
    np.testing.assert_allclose(padded[:, :8], base, rtol=1e-6)
    assert np.all(np.asarray(padded)[:, 8:] == 0.0)


def test_jit_equals_eager():
    attn, emb, vis, mask, special = _case(5)
    f = lambda a, e, v, m, s: token_weights(a, e, v, m, chosen=False, special_token_mask=s, top_k_percent=50.0)
    np.testing.assert_allclose(jax.jit(f)(attn, emb, vis, mask, special), f(attn, emb, vis, mask, special), rtol=1e-6)


def test_layer_band_rounding():
    assert layer_band(32) == (19, 20, 21, 22)  # the reference implementation's layers
    assert layer_band(40) == (24, 25, 26, 27, 28)
    assert layer_band(2) == (1,)
    assert layer_band(1) == (0,)
    assert layer_band(100, (0.29, 0.3)) == (29, 30)
    assert layer_band(10, (1.0, 1.0)) == (9,)
    with pytest.raises(ValueError, match=r"\(0.7, 0.6\)"):
        layer_band(32, (0.7, 0.6))
    with pytest.raises(ValueError, match="num_layers=0"):
        layer_band(0)


def test_bad_options_name_the_value():
    attn, emb, vis, mask, _ = _case(6)
    with pytest.raises(ValueError, match="'zscore'"):
        token_weights(attn, emb, vis, mask, chosen=True, normalize="zscore")
    with pytest.raises(ValueError, match="top_k_percent=0"):
        token_weights(attn, emb, vis, mask, chosen=True, top_k_percent=0)
    with pytest.raises(ValueError, match="N_img=1"):
        local_relevance(jnp.ones((1, 2, 1)))
