"""The one typed configuration schema: a dataclass per section, each field with the comment that
docs/configuration.md shows (`config/reference.py`). `aevb_dist.config.load_config` builds one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class LatentLayerConfig:
    """One stochastic layer of `model.latent_layers`."""

    # Dimensions of this layer's z_l.
    latent_dim: int = 50
    # Widths of the hidden layers of q_φ(z_l | the layer below), mirrored in p_θ(the layer below | z_l).
    hidden_sizes: list[int] = field(default_factory=lambda: [100, 100])


@dataclass
class ModelConfig:
    """Encoder q_φ(z|x) and decoder p_θ(x|z) (paper, Appendix C)."""

    # Pixels per example (784 for MNIST's 28×28); checked against the data.
    input_dim: int = 784
    # Widths of the hidden layers of the encoder and of the (mirrored) decoder.
    hidden_sizes: list[int] = field(default_factory=lambda: [500])
    # The hidden layers' nonlinearity: tanh (the paper's), relu, softplus, sigmoid or elu.
    activation: str = "tanh"
    # Dimensions of z.
    latent_dim: int = 20
    # p_θ(x|z): bernoulli (binarized pixels), gaussian (Frey Face), continuous_bernoulli, discretized_logistic;
    # for counts (cells × genes): poisson, negative_binomial, zinb, multinomial (docs/single_cell.md).
    likelihood: str = "bernoulli"
    # The family of q_φ(z|x) and its reparameterization route: see aevb_dist/model/posteriors.py.
    posterior: str = "gaussian"
    # Frey Face: the paper squashes the Gaussian decoder's means into (0, 1) with a sigmoid.
    squash_mean: bool = False
    # Initial parameters drawn from N(0, init_std²) as in the paper (Section 5); None = PyTorch default.
    init_std: Optional[float] = None
    # The mlp's initial weights: default (PyTorch's) or glorot_uniform (U(±√(6/(fan_in+fan_out))), biases 0:
    # Burda et al.'s code).
    init: str = "default"
    # The mlp decoder's output bias for Bernoulli models: default (as model.init leaves it), zero, or data_mean:
    # the logit of the training set's mean pixel clipped to [0.001, 0.999], computed from the data when a run
    # starts and recorded in its checkpoints (Burda et al.'s code; worth ~1.4 nats of log p(x) elsewhere).
    output_bias_init: str = "default"
    # mlp: the paper's networks on flat rows. conv: stride-2 convolutions with these widths and a mirrored
    # decoder, for images. "package.module:function": your own pair (docs/models.md, "Your own networks").
    architecture: str = "mlp"
    # model.architecture=conv: the channels of each stride-2 convolution.
    conv_channels: list[int] = field(default_factory=lambda: [32, 64])
    # Each example's shape ([H, W] or [C, H, W]); None: the training data's, filled in by `train`.
    input_shape: Optional[list[int]] = None
    # Stochastic layers from x upward, each {latent_dim, hidden_sizes}: p(z_L) ∏ p(z_l | z_{l+1}) p(x | z_1) with
    # q(z_1 | x) ∏ q(z_{l+1} | z_l), Gaussian conditionals (Burda et al. 2015, §5; docs/models.md). When set, they
    # replace model.latent_dim and model.hidden_sizes. Empty: one stochastic layer.
    latent_layers: list[LatentLayerConfig] = field(default_factory=list)
    # Counts: categorical covariates both networks are conditioned on, one-hot beside x and beside z (scVI's batch
    # correction): columns `prepare` wrote, e.g. [batch] for --batch-key (docs/single_cell.md).
    covariates: list[str] = field(default_factory=list)
    # The number of categories of each of model.covariates; None: the training data's, filled in by `train`.
    covariate_sizes: Optional[list[int]] = None


@dataclass
class DataConfig:
    # The training split: a folder of Parquet shards written by `aevb-dist prepare` (local, s3://, gs://).
    train_uri: str = ""
    test_uri: Optional[str] = None  # none: no test-set ELBO during training
    # Parquet written elsewhere with encoded PNG/JPEG images (e.g. by Hugging Face `datasets`): the image
    # column, decoded as it streams. None: `image`, for files that have no `pixels` column.
    image_column: Optional[str] = None
    # Bernoulli models: how [0, 1] intensities become {0, 1} (a reader option, not baked in).
    binarization: str = "dynamic"
    # Shuffle the row groups' order and the rows within each window, every epoch (seeded by the epoch).
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
    # Load the next shuffle window in a background thread while steps run. None: yes from remote storage
    # (hides a GET's latency) and when training on a GPU (the CPU is free), else no: on CPU the step's
    # threads use every core and a reader thread competes with them (data/prefetch.py).
    read_ahead: Optional[bool] = None
    # Each worker keeps the training row groups it reads in memory, decoded (uint8: a byte a pixel), up to this
    # many MiB, and later epochs read them from there: no decompression, checksums or GETs again. What does not
    # fit is read every epoch. 0: read every row group from storage every epoch (data/decoded_cache.py).
    decoded_cache_mib: int = 512
    # On a GPU without data.cache_on_device: threads that decode a shuffle window's row groups (zstd, checksums)
    # while the previous window trains (train/device_stream.py). None: one per row group of a window, up to the
    # cores this process may use.
    decode_threads: Optional[int] = None


@dataclass
class TrainConfig:
    # Data-parallel workers (the most, for an elastic run).
    num_workers: int = 1
    # Elastic: with this set, Ray Train runs between train.min_workers and train.num_workers workers, restarts
    # the group smaller from the newest checkpoint when a node is lost, and grows back when capacity returns.
    # Needs train.global_batch_size (results independent of the count) and train.max_failures > 0.
    min_workers: Optional[int] = None
    # One GPU per worker; gradients all-reduced with NCCL instead of gloo.
    use_gpu: bool = False
    # With train.use_gpu on a Ray cluster: the share of a GPU each worker holds. Below 1, workers share GPUs
    # (e.g. 0.5: two a GPU) and all-reduce with gloo, which takes CUDA tensors (NCCL refuses two ranks on one
    # device). For models too small to fill a GPU.
    gpus_per_worker: float = 1.0
    # CPUs reserved per worker; None sizes workers to the embedded machine (leaves room for the driver).
    cpus_per_worker: Optional[float] = None
    # Examples each worker takes per step (without train.global_batch_size).
    batch_size_per_worker: int = 100
    # The paper's M, whatever the number of workers: the global batches (examples, order, binarization,
    # noise) do not depend on how many workers compute them, and a run may resume with another count.
    # None: each worker takes batch_size_per_worker rows a step from its share of the row groups.
    global_batch_size: Optional[int] = None
    # Stop after this many steps in all, across resumes (takes precedence over train.num_epochs).
    max_steps: Optional[int] = None
    # Stop after this many passes over the training set (with neither set: one epoch).
    num_epochs: Optional[int] = None
    # The bound's estimator: A (generic SGVB, eq. 6), B (analytic KL, eq. 7, Appendix B) or iwae.
    estimator: str = "B"
    # KL warm-up (Sønderby et al., 2016), estimator B: the KL term weighed by β rising linearly from 0 to 1 over
    # this many steps. 0: none. The logged train ELBO stays the true bound; train_objective is what is optimized.
    kl_warmup_steps: int = 0
    # Free bits (Kingma et al., 2016), estimator B: each latent's KL, averaged over the worker's batch, counts
    # as at least this many nats (below it, nothing pushes it lower). None: none.
    free_bits: Optional[float] = None
    # The paper's L (estimators A, B) or the number of importance samples K (iwae).
    num_latent_samples: int = 1
    # MAP estimation of θ: standard deviation of a Gaussian prior on every parameter; None = ML.
    theta_prior_std: Optional[float] = None
    # A metrics.csv row (and a progress line) every this many steps.
    log_every_steps: int = 10
    # The test-set ELBO in metrics.csv every this many steps (0: at the last step only).
    eval_every_steps: int = 0
    # Restarts of the worker group after a failure, from the newest checkpoint (-1: without limit).
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
    # The optimizer: adagrad (the paper's), adam, sgd, or adam_burda2015: Adam as Burda et al.'s released code runs
    # it (β1 = 0.99, second moments starting at 1, ε = 1e-4 on the uncorrected √v, on the summed minibatch gradient).
    name: str = "adagrad"
    # The learning rate (the first one, with optim.lr_schedule).
    lr: float = 0.02
    # The learning rate by epoch: "constant", or "burda2015" (optim.lr·10^(−i/7) for 3^i epochs, i = 0…7:
    # 3,280 epochs, then the last rate; Burda et al. 2015, §5). Set from the epoch, so a resume keeps it.
    lr_schedule: str = "constant"
    # The optimizer's ε (Adam: added to √v̂; Adagrad: to √Σg²); None: its default (1e-8, 1e-10; adam_burda2015: 1e-4).
    eps: Optional[float] = None


@dataclass
class RunConfig:
    # The run's name: its folder is {run.storage_uri}/{run.name}; the same name resumes.
    name: str = "aevb"
    # Where run folders go: a local path or s3://bucket/prefix.
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
    # A checkpoint every this many steps (and one at the end, and when a stop is asked).
    every_steps: int = 500
    # Complete checkpoints kept in the run folder; older ones are removed.
    keep_last: int = 3


@dataclass
class RayConfig:
    # None: start an embedded local Ray. "auto" or "ray://host:port": join a cluster.
    address: Optional[str] = None
    # Forward the workers' own logs (Ray Train's included) to the driver; progress is shown either way.
    show_worker_logs: bool = False
    # Local mode: no Ray is started; the workers are processes of this machine, forked and supervised by the
    # command itself. Seconds instead of ~15 s of start-up; one machine only.
    local_mode: bool = False


@dataclass
class TrackingConfig:
    # An MLflow tracking URI: sqlite:///path/to/mlflow.db, a local folder, or http(s)://host:port of an MLflow
    # server. None: no MLflow (metrics.csv and TensorBoard in the run folder either way). Needs `.[tracking]`.
    mlflow_uri: Optional[str] = None
    # The MLflow experiment the run goes into (created if missing). None: MLflow's "Default".
    experiment: Optional[str] = None


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # The run's one seed: initial parameters, step noise (by step and global position), binarization
    # (by epoch and example) and shuffles all derive from it, never from the worker count.
    seed: int = 0
