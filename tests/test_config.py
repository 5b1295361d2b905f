"""The typed config schema: files, overrides and every kind of user mistake."""

import glob
import os
import subprocess
import sys

import pytest

from aevb_dist.config import config_from_dict, load_config, to_dict
from aevb_dist.config.schema import Config
from aevb_dist.model.vae import VAE
from tests.helpers import REPO, SMOKE, aevb

MNIST_CONFIG = os.path.join(REPO, "configs", "mnist.yaml")
SHIPPED_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))


def test_the_shipped_configs_are_found():
    assert len(SHIPPED_CONFIGS) >= 4, SHIPPED_CONFIGS  # smoke, mnist, mnist_burda, frey_face at least


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_every_shipped_config_loads_and_builds_a_model(path):
    cfg = load_config(path, [])
    vae = VAE.from_config(cfg.model)
    assert vae.input_dim == cfg.model.input_dim and vae.latent_dim == cfg.model.latent_dim


def test_mnist_config_is_the_papers_model():
    cfg = load_config(MNIST_CONFIG, [])
    assert cfg.model.hidden_sizes == [500] and cfg.model.activation == "tanh"
    assert cfg.model.latent_dim == 20 and cfg.model.likelihood == "bernoulli"
    assert cfg.optim.name == "adagrad" and cfg.train.num_latent_samples == 1
    assert cfg.train.batch_size_per_worker * cfg.train.num_workers == 100


def test_overrides_win_and_a_length_override_replaces_the_other():
    cfg = load_config(MNIST_CONFIG, ["train.max_steps=7", "model.hidden_sizes=[32,16]", "seed=3"])
    assert cfg.train.max_steps == 7 and cfg.train.num_epochs is None
    assert cfg.model.hidden_sizes == [32, 16] and cfg.seed == 3
    assert isinstance(cfg, Config)


def test_round_trip_through_dict():
    cfg = load_config(SMOKE, ["train.num_workers=2"])
    assert config_from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.batchsize=3", r"unknown config key 'train.batchsize'; allowed keys in train: .*batch_size_per_worker"),
        ("trian.max_steps=3", r"unknown config key 'trian' \(did you mean train\?\); allowed keys: model, data, train"),
        (
            "train.max_step=3",
            r"unknown config key 'train.max_step' \(did you mean train.max_steps\?\); allowed keys in",
        ),
        ("model.max_steps=3", r"unknown config key 'model.max_steps' \(did you mean train.max_steps\?\)"),
        ("optim.learning_rate=0.1", r"unknown config key 'optim.learning_rate'; allowed keys in optim: name, lr,"),
        ("train.num_workers=two", r"'train.num_workers' has the wrong type"),
        ("model.hidden_sizes=[a]", r"'model.hidden_sizes\[0\]' has the wrong type"),
        ("train.estimator=C", r"train.estimator='C' is not allowed; choose one of: A, B, iwae"),
        ("model.likelihood=gamma", r"model.likelihood='gamma' is not allowed; choose one of: bernoulli, gaussian"),
        ("train.batch_size_per_worker=0", r"train.batch_size_per_worker=0 must be a positive number"),
        ("train.num_workers=-1", r"train.num_workers=-1 must be a positive number"),
        ("model.latent_dim=0", r"model.latent_dim=0 must be a positive number"),
        ("run.storage_uri=ftp://host/x", r"unknown scheme 'ftp://'"),
        ("model.squash_mean=true", r"squash_mean=true only applies to model.likelihood=gaussian"),
        ("run.name=a/b", r"run.name='a/b' must be a non-empty name without '/'"),
        ("train.max_steps", r"must look like key=value"),
        ("data.decode_threads=0", r"data.decode_threads=0 must be a positive number"),
        ("train.gpus_per_worker=0.5", r"train.gpus_per_worker applies with train.use_gpu=true"),
        ("train.use_gpu=true train.gpus_per_worker=1.5", r"gpus_per_worker=1.5 must lie in \(0, 1\]"),
        ("train.use_gpu=true train.gpus_per_worker=0.5 ray.local_mode=true", r"a GPU of its own"),
    ],
)
def test_bad_config_is_a_value_error_naming_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(SMOKE, override.split(" "))


def test_both_lengths_at_once_is_impossible():
    with pytest.raises(ValueError, match="set only one of train.max_steps and train.num_epochs"):
        load_config(SMOKE, ["train.max_steps=3", "train.num_epochs=2"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ValueError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"), [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(str(bad), [])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  hidden: [3]\n")
    with pytest.raises(ValueError, match=r"unknown config key 'model.hidden'"):
        load_config(str(unknown), [])


def test_cli_reports_a_bad_key_in_one_line_without_traceback():
    proc = aevb("config", SMOKE, "train.bogus=1")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "unknown config key 'train.bogus'" in proc.stderr
    )
    assert "Traceback" not in proc.stderr


def test_cli_prints_resolved_config_and_version():
    proc = aevb("config", MNIST_CONFIG, "train.max_steps=9", check=True)
    assert "max_steps: 9" in proc.stdout and "num_epochs: null" in proc.stdout
    out = subprocess.run([sys.executable, "-m", "aevb_dist", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("aevb-dist ")


def test_docs_configuration_lists_every_key_as_the_schema_says():
    """docs/configuration.md is what the schema generates now: every key, its type, default and comment."""
    from aevb_dist.config import reference
    from tests.helpers import REPO

    assert reference.undocumented() == []  # every field of the schema says what it is for
    with open(f"{REPO}/docs/configuration.md") as f:
        written = f.read()
    assert written == reference.markdown(), "docs/configuration.md is stale: python -m aevb_dist.config.reference > it"
    for key in ("seed", "model.latent_dim", "train.num_workers", "run.lease_timeout_s", "ray.local_mode"):
        assert f"| `{key}` |" in written
