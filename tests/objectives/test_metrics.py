import jax.numpy as jnp
import numpy as np

from mmpo_jax.objectives import metrics


def test_mean_metric_respects_mask_and_accumulates_like_one_batch():
    values = jnp.array([1.0, 2.0, 3.0, 4.0])
    mask = jnp.array([1, 0, 1, 1])
    whole = metrics.finalize({"m": metrics.mean_metric(values, mask)})["m"]
    a = {"m": metrics.mean_metric(values[:1], mask[:1])}
    b = {"m": metrics.mean_metric(values[1:], mask[1:])}
    split = metrics.finalize(metrics.accumulate(a, b))["m"]
    np.testing.assert_allclose(whole, (1 + 3 + 4) / 3)
    np.testing.assert_allclose(split, whole)


def test_empty_metric_is_zero_not_nan():
    out = metrics.finalize({"m": metrics.mean_metric(jnp.ones(3), jnp.zeros(3))})
    assert float(out["m"]) == 0.0


def test_accumulate_rejects_mismatched_keys():
    import pytest

    with pytest.raises(ValueError, match="b"):
        metrics.accumulate({"a": (1.0, 1.0)}, {"b": (1.0, 1.0)})
