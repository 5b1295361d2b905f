"""The config's checks: every user mistake a one-line ValueError naming the key and the fix.

One `check_<section>` per section of the schema (`schema.py`), each reading only its own section, then
`check_across` for the rules that join sections (where the data and the step are placed, elastic runs, KL weighting, the
captured step). `validate` runs them all, as `load_config` does.
"""

from __future__ import annotations

import math
from typing import Optional

from aevb_dist import names
from aevb_dist.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    RayConfig,
    RunConfig,
    TrackingConfig,
    TrainConfig,
)
from aevb_dist.run.uri import check_tracking_uri, check_uri


def _choice(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")


def _positive(key: str, value: Optional[float], allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ValueError(f"{key}={value} must be a positive number")


def validate(cfg: Config) -> None:
    """Every check of every section, then those across sections; raises ValueError naming the key and the fix."""
    check_model(cfg.model)
    check_data(cfg.data)
    check_train(cfg.train)
    check_optim(cfg.optim)
    check_checkpoint(cfg.checkpoint)
    check_run(cfg.run)
    check_ray(cfg.ray)
    check_tracking(cfg.tracking)
    check_across(cfg)


# -- each section ----------------------------------------------------------------------------------------------
def check_model(m: ModelConfig) -> None:
    _choice("model.activation", m.activation, names.ACTIVATIONS)
    _choice("model.likelihood", m.likelihood, names.LIKELIHOODS)
    _choice("model.posterior", m.posterior, names.POSTERIORS)
    _positive("model.input_dim", m.input_dim)
    _positive("model.latent_dim", m.latent_dim)
    for i, h in enumerate(m.hidden_sizes):
        _positive(f"model.hidden_sizes[{i}]", h)
    _positive("model.init_std", m.init_std, allow_none=True)
    _architecture(m)
    _initialization(m)
    _latent_layers(m)
    _covariates(m)
    if m.squash_mean and m.likelihood != "gaussian":
        raise ValueError("model.squash_mean=true only applies to model.likelihood=gaussian")


def _architecture(m: ModelConfig) -> None:
    if m.architecture not in ("mlp", "conv") and ":" not in m.architecture:
        raise ValueError(
            f'model.architecture={m.architecture!r} is not mlp, conv or a "package.module:function" of your own'
        )
    for i, width in enumerate(m.conv_channels):
        _positive(f"model.conv_channels[{i}]", width)
    if m.input_shape is not None and math.prod(m.input_shape) != m.input_dim:
        raise ValueError(
            f"model.input_shape={list(m.input_shape)} holds {math.prod(m.input_shape)} values, "
            f"model.input_dim={m.input_dim}"
        )


def _covariates(m: ModelConfig) -> None:
    if not m.covariates:
        return
    if m.likelihood not in names.COUNT_LIKELIHOODS:
        raise ValueError(f"model.covariates condition models of counts; model.likelihood={m.likelihood} is not one")
    if m.latent_layers or m.architecture != "mlp":
        raise ValueError("model.covariates condition the one-layer mlp model (unset model.latent_layers)")
    if len(set(m.covariates)) != len(m.covariates):
        raise ValueError(f"model.covariates={list(m.covariates)} names a column twice")
    if m.covariate_sizes is not None and len(m.covariate_sizes) != len(m.covariates):
        raise ValueError("model.covariate_sizes must give one size per model.covariates (or unset it)")


def _latent_layers(m: ModelConfig) -> None:
    for i, layer in enumerate(m.latent_layers):
        _positive(f"model.latent_layers[{i}].latent_dim", layer.latent_dim)
        for j, width in enumerate(layer.hidden_sizes):
            _positive(f"model.latent_layers[{i}].hidden_sizes[{j}]", width)
    if m.latent_layers and m.architecture != "mlp":
        raise ValueError(
            f"model.latent_layers builds mlp conditionals; it does not combine with model.architecture={m.architecture}"
        )
    if m.latent_layers and m.posterior not in ("gaussian", "gaussian_log_std"):
        raise ValueError(
            f"model.latent_layers has Gaussian conditionals in q and p (model.posterior=gaussian or gaussian_log_std); "
            f"model.posterior={m.posterior} applies to one stochastic layer"
        )


def _initialization(m: ModelConfig) -> None:
    _choice("model.init", m.init, names.WEIGHT_INITS)
    _choice("model.output_bias_init", m.output_bias_init, names.OUTPUT_BIAS_INITS)
    if m.init != "default" and m.init_std is not None:
        raise ValueError(f"model.init={m.init} and model.init_std={m.init_std:g} both set the weights; unset one")
    for key, value in (("model.init", m.init), ("model.output_bias_init", m.output_bias_init)):
        if value != "default" and m.architecture != "mlp":
            raise ValueError(f"{key}={value} applies to model.architecture=mlp (your networks initialize themselves)")
    if m.output_bias_init == "data_mean" and m.likelihood != "bernoulli":
        raise ValueError("model.output_bias_init=data_mean sets Bernoulli logits; it needs model.likelihood=bernoulli")


def check_data(d: DataConfig) -> None:
    _choice("data.binarization", d.binarization, names.BINARIZATIONS)
    _positive("data.shuffle_window_row_groups", d.shuffle_window_row_groups)
    _positive("data.decode_threads", d.decode_threads, allow_none=True)
    _positive("data.num_partitions", d.num_partitions, allow_none=True)
    if d.decoded_cache_mib < 0:
        raise ValueError(f"data.decoded_cache_mib={d.decoded_cache_mib} must be >= 0 (0 = no cache)")
    check_uri("data.train_uri", d.train_uri)
    check_uri("data.test_uri", d.test_uri or "")


def check_train(t: TrainConfig) -> None:
    _choice("train.estimator", t.estimator, names.ESTIMATORS)
    _choice("train.on_nonfinite", t.on_nonfinite, names.ON_NONFINITE)
    _choice("train.allreduce_dtype", t.allreduce_dtype, names.ALLREDUCE_DTYPES)
    _choice("train.autocast", t.autocast, names.AUTOCAST_DTYPES)
    for key in ("num_workers", "batch_size_per_worker", "num_latent_samples", "log_every_steps"):
        _positive(f"train.{key}", getattr(t, key))
    for key in ("cpus_per_worker", "theta_prior_std", "max_steps", "num_epochs", "global_batch_size", "free_bits"):
        _positive(f"train.{key}", getattr(t, key), allow_none=True)
    if t.eval_every_steps < 0:
        raise ValueError(f"train.eval_every_steps={t.eval_every_steps} must be >= 0 (0 = only at the end)")
    if t.max_failures < -1:
        raise ValueError(f"train.max_failures={t.max_failures} must be >= -1 (-1 retries forever)")
    if t.max_steps is not None and t.num_epochs is not None:
        raise ValueError("set only one of train.max_steps and train.num_epochs (the other must be null)")
    if not 0 < t.gpus_per_worker <= 1:
        raise ValueError(f"train.gpus_per_worker={t.gpus_per_worker:g} must lie in (0, 1]: a worker uses one device")
    if t.gpus_per_worker != 1 and not t.use_gpu:
        raise ValueError("train.gpus_per_worker applies with train.use_gpu=true")
    if t.min_workers is not None:
        _elastic(t)
    _kl_weighting(t)


def _elastic(t: TrainConfig) -> None:
    _positive("train.min_workers", t.min_workers)
    if t.min_workers > t.num_workers:
        raise ValueError(f"train.min_workers={t.min_workers} is more than train.num_workers={t.num_workers}")
    if t.global_batch_size is None:
        raise ValueError(
            "train.min_workers (elastic) needs train.global_batch_size: the worker count may change "
            "mid-run, and only global batches keep the training the same for every count"
        )
    if t.max_failures == 0:
        raise ValueError(
            "train.min_workers (elastic) needs train.max_failures > 0 (or -1): Ray Train resizes "
            "the group by restarting it"
        )


def _kl_weighting(t: TrainConfig) -> None:
    if t.kl_warmup_steps < 0:
        raise ValueError(f"train.kl_warmup_steps={t.kl_warmup_steps} must be >= 0 (0: no warm-up)")
    if not (t.kl_warmup_steps or t.free_bits is not None):
        return
    if t.estimator != "B":
        raise ValueError(
            "train.kl_warmup_steps and train.free_bits weigh the analytic KL of estimator B; set train.estimator=B"
        )
    if t.free_bits is not None and t.global_batch_size is not None:
        raise ValueError(
            "train.free_bits averages each latent's KL over a worker's batch, which depends on the worker count; "
            "train.global_batch_size promises results that do not: unset one of them"
        )


def check_optim(o: OptimConfig) -> None:
    _choice("optim.name", o.name, names.OPTIMIZERS)
    _positive("optim.lr", o.lr)
    _choice("optim.lr_schedule", o.lr_schedule, names.LR_SCHEDULES)
    _positive("optim.eps", o.eps, allow_none=True)
    if o.eps is not None and o.name == "sgd":
        raise ValueError("optim.eps applies to adam and adagrad; SGD has no ε (unset optim.eps)")


def check_checkpoint(c: CheckpointConfig) -> None:
    _positive("checkpoint.every_steps", c.every_steps)
    _positive("checkpoint.keep_last", c.keep_last)


def check_run(r: RunConfig) -> None:
    _positive("run.lease_timeout_s", r.lease_timeout_s)
    _positive("run.storage_retry_s", r.storage_retry_s)
    if not r.name or "/" in r.name:
        raise ValueError(f"run.name={r.name!r} must be a non-empty name without '/'")
    check_uri("run.storage_uri", r.storage_uri)


def check_ray(r: RayConfig) -> None:
    if r.local_mode and r.address:
        raise ValueError(
            f"ray.local_mode=true runs on this machine without a cluster; it cannot join "
            f"ray.address={r.address} (unset one of them)"
        )


def check_tracking(t: TrackingConfig) -> None:
    if t.mlflow_uri is not None:
        if not t.mlflow_uri.strip():
            raise ValueError("tracking.mlflow_uri is empty; leave it unset (null) for no MLflow tracking")
        check_tracking_uri("tracking.mlflow_uri", t.mlflow_uri)
    if t.experiment is not None and not t.experiment.strip():
        raise ValueError("tracking.experiment is empty; leave it unset (null) for MLflow's Default experiment")
    if t.experiment is not None and t.mlflow_uri is None:
        raise ValueError(f"tracking.experiment={t.experiment!r} is set but tracking.mlflow_uri is not; set both")


# -- across sections -------------------------------------------------------------------------------------------
def check_across(cfg: Config) -> None:
    """How the data and the step are laid out: global batches over partitions, the device cache, GPUs shared
    or not, and what the captured CUDA-graph step can serve."""
    t, d = cfg.train, cfg.data
    if d.num_partitions is not None and t.global_batch_size is None:
        raise ValueError("data.num_partitions applies to train.global_batch_size runs; set train.global_batch_size")
    if t.global_batch_size is not None and d.num_partitions is not None:
        check_partitioning(d.num_partitions, t.global_batch_size, t.num_workers)
    if t.min_workers is not None and cfg.ray.local_mode:
        raise ValueError(
            "train.min_workers (elastic) needs Ray (a cluster or the embedded one), not ray.local_mode=true"
        )
    if t.global_batch_size is not None and d.cache_on_device:
        raise ValueError("data.cache_on_device=true does not yet serve train.global_batch_size runs; unset one of them")
    if cfg.model.latent_layers and t.estimator == "B":
        raise ValueError(
            "train.estimator=B needs the KL to the prior in closed form, which a stack of model.latent_layers does "
            "not have (the layers' KL terms couple): use train.estimator=A or iwae"
        )
    if cfg.model.latent_layers and t.autocast != "none":
        raise ValueError(f"train.autocast={t.autocast} applies to one stochastic layer; unset model.latent_layers")
    if t.gpus_per_worker != 1 and cfg.ray.local_mode:
        raise ValueError("ray.local_mode=true gives each worker a GPU of its own: unset train.gpus_per_worker")
    if t.use_gpu and d.cache_on_device and t.cuda_graph:
        why = captured_step_cannot_serve(t, cfg.optim, streamed=False)
        if why is not None:
            raise ValueError(f"train.cuda_graph=true cannot capture this run's step: {why}; set train.cuda_graph=false")


def captured_step_cannot_serve(train: TrainConfig, optim: OptimConfig, *, streamed: bool) -> Optional[str]:
    """Why the captured CUDA-graph step (train.cuda_graph=true on a GPU) cannot run a run of these sections,
    or None where it can. One rule for both of its callers, so they never disagree: the config check refuses
    a device-cache run for it, and a streamed run (`streamed`) takes the eager step instead, saying why
    (train/trainer.py)."""
    if streamed and train.global_batch_size is not None:
        return "train.global_batch_size runs read partitioned epochs on the host"
    if optim.name in ("adagrad", "adam_burda2015"):
        return f"optim.name={optim.name} keeps its step count on the host (the graph needs optim.name=adam or sgd)"
    if optim.lr_schedule != "constant" and optim.name != "adam":
        return (
            f"optim.lr_schedule={optim.lr_schedule} needs optim.name=adam in the graph (its learning rate is a "
            "device tensor the graph reads)"
        )
    if train.on_nonfinite == "skip":
        return (
            "train.on_nonfinite=skip needs the eager step (the captured step applies every update and stops at "
            "the next log line instead)"
        )
    if train.kl_warmup_steps or train.free_bits is not None:
        return "train.kl_warmup_steps and train.free_bits need the eager step, which weighs the KL"
    return None


def check_partitioning(num_partitions: int, global_batch_size: int, num_workers: int) -> None:
    """A global-batch run's layout: every partition gives each global batch a row, every worker whole
    partitions. Checked on the config and again by each worker (the default or recorded partitions)."""
    if global_batch_size < num_partitions:
        raise ValueError(
            f"train.global_batch_size={global_batch_size} is smaller than data.num_partitions="
            f"{num_partitions}: every partition gives at least one row to each global batch"
        )
    if num_workers > num_partitions:
        raise ValueError(
            f"train.num_workers={num_workers} is more than data.num_partitions={num_partitions}: "
            "a worker takes whole partitions (raise data.num_partitions for a new run)"
        )


def same_image_shape(a, b) -> bool:
    """Whether two image shapes are the same: [1, H, W] is [H, W] (one channel, written or not)."""

    def squeezed(shape) -> list[int]:
        return list(shape)[1:] if len(shape) == 3 and shape[0] == 1 else list(shape)

    return squeezed(a) == squeezed(b)
