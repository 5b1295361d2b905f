"""Architectures by config (`model.architecture`): the conv pair and a user's own pair by import path work
with every estimator and likelihood, train, resume bit for bit and evaluate like the paper's MLP; what does
not fit is refused in one line before any worker starts."""

import numpy as np
import pytest
import torch

from aevb_dist.config import load_config
from aevb_dist.data.prepare import prepare
from aevb_dist.model.elbo import per_example_bound
from aevb_dist.model.vae import VAE
from aevb_dist.train.driver import train
from tests.helpers import SMOKE, aevb, assert_bitwise_equal, final_state, tiny_overrides

EXAMPLE = "configs.my_networks:build"


def _model(architecture: str, shape: list[int], likelihood: str = "bernoulli", **extra) -> VAE:
    overrides = [
        f"model.architecture={architecture}",
        f"model.input_dim={int(np.prod(shape))}",
        f"model.input_shape={shape}",
        "model.latent_dim=3",
        "model.hidden_sizes=[16]",
        f"model.likelihood={likelihood}",
        "model.conv_channels=[4,8]",
    ] + [f"{k}={v}" for k, v in extra.items()]
    return VAE.from_config(load_config(SMOKE, overrides).model, seed=0)


@pytest.mark.parametrize("architecture", ["conv", EXAMPLE])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("shape", [[1, 7, 6], [7, 6]])  # odd sizes: 7 → 3 → 1 and back through output_padding
def test_every_estimator_trains_every_parameter_of_a_shaped_architecture(architecture, likelihood, shape):
    vae = _model(architecture, shape, likelihood)
    x = torch.rand(5, 42) if likelihood == "gaussian" else (torch.rand(5, 42) < 0.5).float()
    for estimator, samples in (("A", 2), ("B", 1), ("iwae", 4)):
        vae.zero_grad()
        bound = per_example_bound(vae, x, estimator, samples, generator=torch.Generator().manual_seed(0))
        assert bound.shape == (5,) and torch.isfinite(bound).all()
        bound.sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.parameters()), estimator
    assert vae.sample(4).shape == (4, 42)
    if architecture == "conv":
        assert any(isinstance(m, torch.nn.Conv2d) for m in vae.modules())


def test_what_does_not_fit_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="cannot import 'no_such_package.nets'"):
        _model("no_such_package.nets:build", [1, 4, 4])
    with pytest.raises(ValueError, match="configs.my_networks has no function 'missing'"):
        _model("configs.my_networks:missing", [1, 4, 4])
    with pytest.raises(
        ValueError, match=r"the decoder maps \[2, 3\] to \[2, 1, 1, 4, 4\]; it must give \[2, 2, 1, 4, 4\]"
    ):
        _model("tests.test_networks:one_output_per_pixel", [1, 4, 4], likelihood="gaussian")
    with pytest.raises(ValueError, match="halvings of an image of shape"):
        _model("conv", [1, 4, 4], **{"model.conv_channels": "[4,4,4,4]"})
    with pytest.raises(ValueError, match="model.architecture='resnet' is not mlp, conv"):
        load_config(SMOKE, ["model.architecture=resnet"])
    # From the command line: exit 2, one line, before any worker starts.
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((40, 4, 4)).astype(np.float32))
    prepare(str(tmp_path / "x.npy"), str(tmp_path / "pq"), num_shards=1, report=lambda m: None)
    bad = aevb(
        "train",
        SMOKE,
        *tiny_overrides(str(tmp_path / "pq"), str(tmp_path / "runs")),
        "model.architecture=no_such_package.nets:build",
        timeout=120,
    )
    assert (
        bad.returncode == 2 and "Traceback" not in bad.stderr and "cannot import 'no_such_package.nets'" in bad.stderr
    )
    wrong = aevb(
        "train",
        SMOKE,
        *tiny_overrides(str(tmp_path / "pq"), str(tmp_path / "runs")),
        "model.architecture=conv",
        "model.input_shape=[2,8]",
        timeout=120,
    )
    assert (
        wrong.returncode == 2
        and "model.input_shape=[2, 8] differs from the training data's shape [4, 4]" in wrong.stderr
    ), wrong.stderr[-2000:]


def one_output_per_pixel(model_cfg, input_shape, params_per_dim):
    """A factory that ignores params_per_dim: wrong for a gaussian likelihood."""
    from torch import nn

    d = int(np.prod(input_shape))
    return (
        nn.Sequential(nn.Flatten(), nn.Linear(d, 2 * model_cfg.latent_dim)),
        nn.Sequential(nn.Linear(model_cfg.latent_dim, d), nn.Unflatten(1, (1, *input_shape))),
    )


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["conv", EXAMPLE])
def test_a_shaped_architecture_trains_with_2_workers_resumes_bit_for_bit_and_evaluates(
    architecture, tmp_path, monkeypatch
):
    from aevb_dist.eval.jobs import encode, evaluate
    from aevb_dist.eval.plotting import plot_run

    rng = np.random.default_rng(0)
    images = np.clip(
        rng.random((4, 1, 6, 6))[rng.integers(0, 4, 240)] + 0.1 * rng.standard_normal((240, 1, 6, 6)), 0, 1
    ).astype(np.float32)
    np.save(tmp_path / "x.npy", images)
    prepare(str(tmp_path / "x.npy"), str(tmp_path / "pq"), num_shards=2, rows_per_row_group=16, report=lambda m: None)
    common = tiny_overrides(
        str(tmp_path / "pq"),
        str(tmp_path / "runs"),
        **{
            "model.architecture": architecture,
            "model.input_dim": 36,
            "model.conv_channels": "[4,8]",
            "ray.local_mode": "true",
            "train.num_workers": 2,
            "model.hidden_sizes": "[16]",
        },
    )
    train(load_config(SMOKE, common + ["run.name=straight", "train.max_steps=12"]))
    train(load_config(SMOKE, common + ["run.name=resumed", "train.max_steps=5"]))
    last = train(load_config(SMOKE, common + ["run.name=resumed", "train.max_steps=12"]))
    straight, resumed = (
        final_state(str(tmp_path / "runs" / "straight")),
        final_state(str(tmp_path / "runs" / "resumed")),
    )
    assert_bitwise_equal(straight, resumed)
    assert last["step"] == 12 and np.isfinite(last["test_elbo"])
    run = str(tmp_path / "runs" / "straight")
    if architecture == EXAMPLE:
        # A checkpoint names the code that builds its model: evaluating one runs that code only when trusted.
        with pytest.raises(
            ValueError,
            match=f"built by '{EXAMPLE}', code that is imported and run by name; "
            f"if you trust it, set AEVB_TRUSTED_ARCHITECTURES={EXAMPLE}",
        ):
            evaluate(run, str(tmp_path / "pq" / "test"), num_importance_samples=8, num_workers=1)
        monkeypatch.setenv("AEVB_TRUSTED_ARCHITECTURES", f"other.module:f, {EXAMPLE}")
    result = evaluate(run, str(tmp_path / "pq" / "test"), num_importance_samples=8, num_workers=1)
    assert np.isfinite(result["log_marginal_likelihood"]) and result["log_marginal_likelihood"] >= result["elbo"] - 1
    encode(run, str(tmp_path / "pq" / "test"), str(tmp_path / "codes"), num_workers=1)
    assert any(name.endswith("samples.png") for name in plot_run(run, str(tmp_path / "plots")))
