"""`aevb-dist submit` and `aevb-dist jobs`: training and evaluation as Ray Jobs.

The config is validated here, before anything reaches the cluster. The job gets a
working directory holding the resolved config, this very `aevb_dist` package as a
py_module, and optionally pinned requirements. It gets no credentials: a job's runtime
environment is returned by the job server to every client (`list_jobs`) and written to the
cluster's runtime-env agent log, so the cluster's own identity (an instance role, a Kubernetes
service account) reaches storage. `--pass-env NAMES` forwards variables all the same, with a
warning that says where they become readable.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from importlib import metadata
from typing import Optional

from aevb_dist.cluster.ray_runtime import AUTH_HELP, cluster_auth_token
from aevb_dist.config import absolute_local_uris, to_yaml
from aevb_dist.config.schema import Config
from aevb_dist.console import say
from aevb_dist.run.storage import s3_endpoint

REQUIREMENTS = ("torch", "pyarrow", "fsspec", "omegaconf", "numpy", "scipy", "s3fs", "tensorboard", "matplotlib")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def job_address(address: Optional[str]) -> str:
    return address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS


def pinned_requirements() -> list[str]:
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return pins


def runtime_env(working_dir: str, *, pip: bool, pass_env: tuple[str, ...] = ()) -> dict:
    """The job's runtime environment: its files, and only the variables named in `pass_env`."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    env: dict = {"working_dir": working_dir, "py_modules": [package_dir]}
    missing = [name for name in pass_env if name not in os.environ]
    if missing:
        raise ValueError(f"--pass-env names {', '.join(missing)}, not set in this shell")
    if pass_env:
        say(
            f"warning: --pass-env puts {', '.join(pass_env)} into the job's metadata: every client of the job "
            "server can read it (Ray's list_jobs, the dashboard) and the cluster's runtime-env agent "
            "logs it. Prefer the cluster's own identity (instance role, service account)"
        )
        env["env_vars"] = {name: os.environ[name] for name in pass_env}
    if pip:
        env["pip"] = pinned_requirements()
    return env


def _client(address: Optional[str]):
    """A job-server client that sends the cluster's token (Ray's client sends it only when
    RAY_AUTH_MODE=token is set), unless RAY_AUTH_MODE=disabled."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = job_address(address)
    token = cluster_auth_token() if os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled" else None
    try:
        return JobSubmissionClient(url, headers={"Authorization": f"Bearer {token}"} if token else None)
    except AuthenticationError:
        sent = "the token it was sent is not the cluster's" if token else "no token was found to send"
        raise ValueError(f"the Ray job server at {url} refused authentication ({sent}); {AUTH_HELP}") from None
    except Exception as err:  # ConnectionError and friends, from requests or Ray
        raise ValueError(
            f"cannot reach the Ray job server at {url} ({type(err).__name__}); start a head "
            "(`ray start --head`) or pass --address http://HEAD:8265"
        ) from None


def submit(
    cfg: Config,
    *,
    address: Optional[str] = None,
    entrypoint: Optional[str] = None,
    wait: bool = True,
    pip: bool = False,
    pass_env: tuple[str, ...] = (),
    sweep: Optional[tuple[str, list[str]]] = None,
) -> tuple[str, int]:
    """Submit a job; returns (job id, exit status: 0 when it succeeded or when not waiting). `sweep`: (SPACE.yaml,
    the sweep's options as `aevb-dist sweep` takes them): the job runs the sweep instead of one run."""
    if sweep is not None and entrypoint is not None:
        raise ValueError("--sweep and --entrypoint each say what the job runs: give one of them")
    if cfg.ray.local_mode and entrypoint is None:
        raise ValueError(
            "ray.local_mode=true trains outside Ray, on the machine that runs it; a submitted job "
            "would bypass the cluster's scheduling. Submit with ray.local_mode=false"
        )
    cfg = absolute_local_uris(cfg)  # a local head shares this machine's paths
    # An endpoint set in this shell ($AWS_ENDPOINT_URL...) travels in the config: it is no secret.
    cfg.run.s3_endpoint_url = s3_endpoint(cfg.run.s3_endpoint_url)
    client = _client(address)
    with tempfile.TemporaryDirectory(prefix="aevb-job-") as working_dir:
        with open(os.path.join(working_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
        args = ["train", "config.yaml"] if entrypoint is None else shlex.split(entrypoint)
        if sweep is not None:
            space_path, options = sweep
            shutil.copyfile(space_path, os.path.join(working_dir, "space.yaml"))
            args = ["sweep", "config.yaml", "--space", "space.yaml", *options]
        job_id = _submit_with_retry(
            client,
            entrypoint="python -m aevb_dist " + " ".join(shlex.quote(a) for a in args),
            runtime_env=runtime_env(working_dir, pip=pip, pass_env=pass_env),
            submission_id=f"aevb-{cfg.run.name}-{uuid.uuid4().hex[:8]}",
            metadata={"aevb.run_name": cfg.run.name},
        )
    print(job_id, flush=True)
    say(f"submitted {job_id} to {job_address(address)}")
    if not wait:
        return job_id, 0
    return job_id, follow(job_id, address)


def _submit_with_retry(client, timeout_s: float = 90.0, **kwargs) -> str:
    """A head that has just started answers 'No available agent' until its job agent is up: wait for it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                hint = (
                    "; the head's job agent is not running: often its port (52365 by default) is taken, see "
                    "dashboard_agent.log in the head's session logs"
                    if "No available agent" in str(err)
                    else ""
                )
                raise ValueError(f"the job server refused the job: {str(err).splitlines()[0]}{hint}") from None
            time.sleep(2.0)


def follow(job_id: str, address: Optional[str] = None) -> int:
    """Stream a job's logs until it ends; the exit status says how it ended."""
    client = _client(address)

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())
    return report_status(client, job_id)


def report_status(client, job_id: str) -> int:
    info = client.get_job_info(job_id)
    status = str(info.status.value if hasattr(info.status, "value") else info.status)
    say(f"job {job_id}: {status}" + (f" ({info.message})" if info.message and status != "SUCCEEDED" else ""))
    return {"SUCCEEDED": 0, "PENDING": 0, "RUNNING": 0, "STOPPED": 130}.get(status, 1)


def jobs(action: str, job_id: Optional[str], address: Optional[str] = None) -> int:
    client = _client(address)
    if action == "list":
        for info in client.list_jobs():
            print(f"{info.submission_id}\t{info.status}\t{info.entrypoint}")
        return 0
    if not job_id:
        raise ValueError(f"`aevb-dist jobs {action}` needs a JOB_ID")
    if action == "status":
        return report_status(client, job_id)
    if action == "logs":
        print(client.get_job_logs(job_id), end="")
        return 0
    if action == "follow":
        return follow(job_id, address)
    if action == "stop":
        client.stop_job(job_id)
        say(f"asked {job_id} to stop")
        return 0
    raise ValueError(f"unknown jobs action {action!r}; use list, status, logs, follow or stop")
