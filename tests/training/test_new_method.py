"""A method defined outside the package: its declarations alone make it configurable and trainable.

The toy term below scores the chosen response on mDPO's corrupted image with a made-up loss. It
is registered from this file only; the config, the scoring plan (which asks the pipeline for the
corrupted image) and a training step follow from its declaration.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from mmpo_jax.config import checks as config_checks
from mmpo_jax.config.loading import config_module
from mmpo_jax.data.fields import CORRUPTED
from mmpo_jax.engine.scoring import plan_scoring
from mmpo_jax.objectives import registry, terms
from mmpo_jax.objectives.metrics import mean_metric
from mmpo_jax.training.loop import train
from tests.engine import step_fixtures as fx

CHOSEN_ON_CORRUPT = terms.Response("toy_chosen_corrupt", tokens="chosen", image=CORRUPTED)


def _toy_loss(inputs: terms.Inputs) -> terms.TermResult:
    """``softplus(margin - h(y_w | I'))``: a made-up hinge on the corrupted-image reward."""
    reward = (inputs.sequence(terms.POLICY, CHOSEN_ON_CORRUPT)
              - jax.lax.stop_gradient(inputs.sequence(terms.REFERENCE, CHOSEN_ON_CORRUPT)))
    losses = jax.nn.softplus(inputs.options["toy_margin"] - reward)
    return losses, {"loss/toy": mean_metric(jax.lax.stop_gradient(losses))}


TOY = (terms.Term("toy", _toy_loss, {"toy_margin": terms.Option(0.5, bounds=(0.0, None))},
                  terms.pairs(CHOSEN_ON_CORRUPT)),
       terms.Method("toy", {"toy": 1.0}))


def test_a_registered_method_is_configured_planned_and_trained(tmp_path):
    base = config_module(pathlib.Path(__file__).parents[2] / "configs" / "base.py")
    with registry.registered(*TOY):
        config = base.experiment(
            "toy", base.method("toy", toy_margin=1.0),
            data=dict(batch_size=8), optimizer=dict(learning_rate=1e-3),
            train=dict(num_steps=1, progress_bar=False, log_every=1),
            checkpoint=dict(async_save=False), eval=dict(enabled=False))
        assert config.method.toy_margin == 1.0
        config_checks.validate(config, device_count=jax.device_count(),
                               dataset_features=("id", "image", "prompt", "chosen", "rejected"))
        plan = plan_scoring(config.method.to_dict())
        assert plan.policy == plan.reference == (CHOSEN_ON_CORRUPT,)
        assert plan.images == (CORRUPTED,) and plan.pipeline_extras == ("corrupt_pixel_values",)
        result = train(config, model=fx.base_model(), tokenizer=fx.tokenizer(),
                       source=list(fx.records(16)), image_config=fx.IMAGE_CONFIG,
                       workdir=tmp_path)
        assert result.steps == 1
        metrics = result.summary["metrics"]
        # policy == reference at the first step: reward 0, loss softplus(1.0)
        np.testing.assert_allclose(metrics["loss/toy"]["last"], jnp.log1p(jnp.exp(1.0)),
                                   rtol=1e-4)
    assert "toy" not in registry.methods()
