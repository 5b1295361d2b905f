"""The embedded Ray's settings: set where the user set none, kept where the user did, taken back at the end."""

import os

import pytest

from aevb_dist.ray_runtime import EMBEDDED_RAY_ENV, start_ray, stop_ray


@pytest.mark.slow  # starts an embedded Ray twice
def test_the_embedded_rays_settings_apply_to_it_alone(monkeypatch):
    import ray

    for name in EMBEDDED_RAY_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")  # the user's own value
    assert start_ray(None) is True
    try:
        for name, value in EMBEDDED_RAY_ENV.items():
            assert os.environ[name] == ("3" if name == "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" else value)
        assert start_ray(None) is False  # joining our own Ray again changes nothing
    finally:
        stop_ray(True)
    assert [name for name in EMBEDDED_RAY_ENV if name in os.environ] == ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"

    # A Ray the user started in this process: joined as it is, none of the embedded settings left behind.
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="WARNING")
    try:
        assert start_ray(None) is False
        assert [name for name in EMBEDDED_RAY_ENV if name in os.environ] == ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]
    finally:
        ray.shutdown()
