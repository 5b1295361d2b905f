"""The one typed configuration schema, and `load_config`.

Building a config has no side effects: no environment variables are set, no
directories created. Every user mistake is a `ValueError` naming the key and
what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from aevb_dist import names
from aevb_dist.uri import absolute_uri, check_uri


@dataclass
class ModelConfig:
    """Encoder q_φ(z|x) and decoder p_θ(x|z) (paper, Appendix C)."""

    input_dim: int = 784
    hidden_sizes: list[int] = field(default_factory=lambda: [500])
    activation: str = "tanh"
    latent_dim: int = 20
    likelihood: str = "bernoulli"
    # The family of q_φ(z|x) and its reparameterization route: see aevb_dist/posteriors.py.
    posterior: str = "gaussian"
    # Frey Face: the paper squashes the Gaussian decoder's means into (0, 1) with a sigmoid.
    squash_mean: bool = False
    # Initial parameters drawn from N(0, init_std²) as in the paper (Section 5); None = PyTorch default.
    init_std: Optional[float] = None


@dataclass
class DataConfig:
    train_uri: str = ""
    test_uri: Optional[str] = None  # none: no test-set ELBO during training
    # Bernoulli models: how [0, 1] intensities become {0, 1} (a reader option, not baked in).
    binarization: str = "dynamic"
    shuffle: bool = True
    # Rows are shuffled within a window of this many row groups (on top of a shuffled row-group order).
    shuffle_window_row_groups: int = 4
    # With train.global_batch_size: the epoch's order is defined over this many partitions of the data
    # (fixed for a run, recorded in its checkpoints), and a worker takes whole partitions, so at most this
    # many workers. None: the row groups' count, at most the global batch and at most 16.
    num_partitions: Optional[int] = None
    # Each worker holds the whole training set (as stored, e.g. uint8) in its device's memory, read once,
    # and binarizes there with the reader's hash rule: the same batches and bits, no per-step host copy.
    cache_on_device: bool = False


@dataclass
class TrainConfig:
    num_workers: int = 1
    # Elastic: with this set, Ray Train runs between train.min_workers and train.num_workers workers, restarts
    # the group smaller from the newest checkpoint when a node is lost, and grows back when capacity returns.
    # Needs train.global_batch_size (results independent of the count) and train.max_failures > 0.
    min_workers: Optional[int] = None
    use_gpu: bool = False
    # CPUs reserved per worker; None sizes workers to the embedded machine (leaves room for the driver).
    cpus_per_worker: Optional[float] = None
    batch_size_per_worker: int = 100
    # The paper's M, whatever the number of workers: the global batches (examples, order, binarization,
    # noise) do not depend on how many workers compute them, and a run may resume with another count.
    # None: each worker takes batch_size_per_worker rows a step from its share of the row groups.
    global_batch_size: Optional[int] = None
    max_steps: Optional[int] = None
    num_epochs: Optional[int] = None
    estimator: str = "B"
    # The paper's L (estimators A, B) or the number of importance samples K (iwae).
    num_latent_samples: int = 1
    # MAP estimation of θ: standard deviation of a Gaussian prior on every parameter; None = ML.
    theta_prior_std: Optional[float] = None
    log_every_steps: int = 10
    eval_every_steps: int = 0
    max_failures: int = 0
    # A NaN/inf objective or gradient: "error" stops the run naming the step, "skip" drops the step.
    on_nonfinite: str = "error"
    # Gradients travel between workers in this dtype: "bfloat16" halves the all-reduce's bytes at
    # ~3 significant digits per summed gradient (ELBO sums and example counts stay exact).
    allreduce_dtype: str = "float32"
    # torch.compile the objective (forward and backward): fewer, fused kernels; compiles on the first step.
    compile: bool = False
    # On a GPU with data.cache_on_device=true, the whole step (gather, binarize, bound, backward, all-reduce,
    # optimizer update) is captured once as a CUDA graph and replayed: no per-step launch overhead.
    cuda_graph: bool = True
    # "bfloat16": the model's matrix products run under bf16 autocast (parameters and sums stay float32).
    autocast: str = "none"


@dataclass
class OptimConfig:
    name: str = "adagrad"
    lr: float = 0.02


@dataclass
class RunConfig:
    name: str = "aevb"
    storage_uri: str = "./runs"
    # S3-compatible endpoint (MinIO, moto, Ceph...). Credentials come from the environment.
    s3_endpoint_url: Optional[str] = None
    # One writer per run: a run whose lease heartbeat is older than this is taken over (a killed driver).
    lease_timeout_s: float = 60.0
    # Writes to the run folder (checkpoints, metrics) are retried with backoff for this long, then the run
    # stops naming the storage error (its last verified checkpoint stays; a rerun resumes from it).
    storage_retry_s: float = 300.0


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep_last: int = 3


@dataclass
class RayConfig:
    # None: start an embedded local Ray. "auto" or "ray://host:port": join a cluster.
    address: Optional[str] = None
    # Forward the workers' own logs (Ray Train's included) to the driver; progress is shown either way.
    show_worker_logs: bool = False
    # Ray Train's local mode: no Ray cluster is started; the workers are processes of this machine
    # (torch.distributed's elastic launcher). Seconds instead of ~15 s of start-up; one machine only.
    local_mode: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    seed: int = 0


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Schema ← YAML file at `path` ← `key=value` overrides; validated across fields."""
    merged = OmegaConf.structured(Config)
    try:
        if path is not None:
            merged = OmegaConf.merge(merged, _load_yaml(path))
        for item in overrides or []:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([_check_override(item)]))
        merged = _length_override_wins(merged, overrides or [])
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise ValueError(_explain(err)) from None
    validate(cfg)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `to_dict` output (used by workers and checkpoints)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), data))
    except OmegaConfBaseException as err:
        raise ValueError(_explain(err)) from None


def absolute_local_uris(cfg: Config) -> Config:
    """A copy whose local paths are absolute: workers, Ray tasks and jobs run in other folders."""
    cfg = config_from_dict(to_dict(cfg))
    for section, key in (("data", "train_uri"), ("data", "test_uri"), ("run", "storage_uri")):
        value = getattr(getattr(cfg, section), key)
        if value:
            setattr(getattr(cfg, section), key, absolute_uri(value))
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _load_yaml(path: str):
    try:
        loaded = OmegaConf.load(path)
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except OmegaConfBaseException as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from None
    except Exception as err:  # yaml.YAMLError and friends
        raise ValueError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not OmegaConf.is_dict(loaded):
        raise ValueError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
    return loaded


def _length_override_wins(merged, overrides: list[str]):
    """`train.max_steps=N` on the command line replaces a file's `train.num_epochs`, and vice versa."""
    keys = {item.split("=", 1)[0].strip() for item in overrides}
    for given, other in (("max_steps", "num_epochs"), ("num_epochs", "max_steps")):
        if f"train.{given}" in keys and f"train.{other}" not in keys:
            merged.train[other] = None
    return merged


def _check_override(item: str) -> str:
    if "=" not in item or item.startswith("="):
        raise ValueError(f"override {item!r} must look like key=value, e.g. train.max_steps=100")
    return item


def _explain(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)) or "not in struct" in str(err):
        section, _, leaf = key.rpartition(".")
        allowed = _allowed_keys(section)
        return f"unknown config key '{key}'; allowed keys{' in ' + section if section else ''}: {', '.join(allowed)}"
    if isinstance(err, ValidationError):
        first = str(err).splitlines()[0]
        return f"config key '{key}' has the wrong type: {first}"
    return f"invalid config{' at ' + key if key else ''}: {str(err).splitlines()[0]}"


def _allowed_keys(section: str) -> list[str]:
    node: Any = Config
    for part in filter(None, section.split(".")):
        node = {f.name: f for f in dataclasses.fields(node)}.get(part)
        node = node.type if node is not None else None
        if isinstance(node, str):
            node = globals().get(node)
        if node is None or not dataclasses.is_dataclass(node):
            return []
    return [f.name for f in dataclasses.fields(node)]


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _positive(key: str, value: Optional[float], allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ValueError(f"{key}={value} must be a positive number")


def validate(cfg: Config) -> None:
    """Checks that span fields; raises ValueError naming the key and the fix."""
    m, t = cfg.model, cfg.train
    _choice("model.activation", m.activation, names.ACTIVATIONS)
    _choice("model.likelihood", m.likelihood, names.LIKELIHOODS)
    _choice("model.posterior", m.posterior, names.POSTERIORS)
    _positive("model.input_dim", m.input_dim)
    _positive("model.latent_dim", m.latent_dim)
    for i, h in enumerate(m.hidden_sizes):
        _positive(f"model.hidden_sizes[{i}]", h)
    _positive("model.init_std", m.init_std, allow_none=True)
    if m.squash_mean and m.likelihood != "gaussian":
        raise ValueError("model.squash_mean=true only applies to model.likelihood=gaussian")
    _choice("data.binarization", cfg.data.binarization, names.BINARIZATIONS)
    _positive("data.shuffle_window_row_groups", cfg.data.shuffle_window_row_groups)
    _choice("train.estimator", t.estimator, names.ESTIMATORS)
    _choice("train.on_nonfinite", t.on_nonfinite, names.ON_NONFINITE)
    _choice("train.allreduce_dtype", t.allreduce_dtype, names.ALLREDUCE_DTYPES)
    _choice("train.autocast", t.autocast, names.AUTOCAST_DTYPES)
    _choice("optim.name", cfg.optim.name, names.OPTIMIZERS)
    _positive("optim.lr", cfg.optim.lr)
    _positive("train.num_workers", t.num_workers)
    _positive("train.batch_size_per_worker", t.batch_size_per_worker)
    _positive("train.num_latent_samples", t.num_latent_samples)
    _positive("train.cpus_per_worker", t.cpus_per_worker, allow_none=True)
    _positive("train.theta_prior_std", t.theta_prior_std, allow_none=True)
    _positive("train.max_steps", t.max_steps, allow_none=True)
    _positive("train.num_epochs", t.num_epochs, allow_none=True)
    _positive("train.log_every_steps", t.log_every_steps)
    if t.eval_every_steps < 0:
        raise ValueError(f"train.eval_every_steps={t.eval_every_steps} must be >= 0 (0 = only at the end)")
    if t.max_failures < -1:
        raise ValueError(f"train.max_failures={t.max_failures} must be >= -1 (-1 retries forever)")
    if t.max_steps is not None and t.num_epochs is not None:
        raise ValueError("set only one of train.max_steps and train.num_epochs (the other must be null)")
    if t.estimator == "iwae" and t.num_latent_samples < 1:
        raise ValueError("train.estimator=iwae needs train.num_latent_samples >= 1 importance samples")
    _validate_placement(cfg)
    _positive("checkpoint.every_steps", cfg.checkpoint.every_steps)
    _positive("checkpoint.keep_last", cfg.checkpoint.keep_last)
    _positive("run.lease_timeout_s", cfg.run.lease_timeout_s)
    _positive("run.storage_retry_s", cfg.run.storage_retry_s)
    if not cfg.run.name or "/" in cfg.run.name:
        raise ValueError(f"run.name={cfg.run.name!r} must be a non-empty name without '/'")
    check_uri("run.storage_uri", cfg.run.storage_uri)
    if cfg.ray.local_mode and cfg.ray.address:
        raise ValueError(f"ray.local_mode=true runs on this machine without a cluster; it cannot join "
                         f"ray.address={cfg.ray.address} (unset one of them)")
    check_uri("data.train_uri", cfg.data.train_uri)
    check_uri("data.test_uri", cfg.data.test_uri or "")


def _validate_placement(cfg: Config) -> None:
    """How the data and the step are laid out: global batches over partitions, the device cache, the graph."""
    t = cfg.train
    _positive("train.global_batch_size", t.global_batch_size, allow_none=True)
    _positive("data.num_partitions", cfg.data.num_partitions, allow_none=True)
    if cfg.data.num_partitions is not None and t.global_batch_size is None:
        raise ValueError("data.num_partitions applies to train.global_batch_size runs; set train.global_batch_size")
    if t.global_batch_size is not None and cfg.data.num_partitions is not None:
        check_partitioning(cfg.data.num_partitions, t.global_batch_size, t.num_workers)
    if t.min_workers is not None:
        _elastic(cfg)
    if t.global_batch_size is not None and cfg.data.cache_on_device:
        raise ValueError("data.cache_on_device=true does not yet serve train.global_batch_size runs; "
                         "unset one of them")
    if t.use_gpu and cfg.data.cache_on_device and t.cuda_graph:
        if cfg.optim.name == "adagrad":
            raise ValueError("the captured CUDA-graph step (train.cuda_graph=true) needs optim.name=adam or sgd "
                             "(Adagrad keeps its step count on the host); or set train.cuda_graph=false")
        if t.on_nonfinite == "skip":
            raise ValueError("train.on_nonfinite=skip needs the eager step: set train.cuda_graph=false (the "
                             "captured step applies every update and stops at the next log line instead)")


def _elastic(cfg: Config) -> None:
    t = cfg.train
    _positive("train.min_workers", t.min_workers)
    if t.min_workers > t.num_workers:
        raise ValueError(f"train.min_workers={t.min_workers} is more than train.num_workers={t.num_workers}")
    if t.global_batch_size is None:
        raise ValueError("train.min_workers (elastic) needs train.global_batch_size: the worker count may change "
                         "mid-run, and only global batches keep the training the same for every count")
    if t.max_failures == 0:
        raise ValueError("train.min_workers (elastic) needs train.max_failures > 0 (or -1): Ray Train resizes "
                         "the group by restarting it")
    if cfg.ray.local_mode:
        raise ValueError("train.min_workers (elastic) needs Ray (a cluster or the embedded one), not "
                         "ray.local_mode=true")


def check_partitioning(num_partitions: int, global_batch_size: int, num_workers: int) -> None:
    """A global-batch run's layout: every partition gives each global batch a row, every worker whole
    partitions. Checked on the config and again by each worker (the default or recorded partitions)."""
    if global_batch_size < num_partitions:
        raise ValueError(f"train.global_batch_size={global_batch_size} is smaller than data.num_partitions="
                         f"{num_partitions}: every partition gives at least one row to each global batch")
    if num_workers > num_partitions:
        raise ValueError(f"train.num_workers={num_workers} is more than data.num_partitions={num_partitions}: "
                         "a worker takes whole partitions (raise data.num_partitions for a new run)")
