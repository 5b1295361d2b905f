"""`aevb-dist plot`: the paper's Figure 2 (lower bound against samples seen), Figure 4 (the
learned 2-D manifold) and a grid of samples, as PNGs."""

from __future__ import annotations

import io
import math
from typing import Optional

import numpy as np
import torch

from aevb_dist.console import say
from aevb_dist.eval.saved_model import model_from_bytes
from aevb_dist.run import storage
from aevb_dist.run.checkpoint import load_checkpoint_bytes
from aevb_dist.run.metrics import read_metrics


def _figure_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def learning_curve(rows: list[dict], title: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label, style in (("train_elbo", "train", "-"), ("test_elbo", "test", "o--")):
        pts = [(r["samples_seen"], r[key]) for r in rows if r["samples_seen"] > 0 and math.isfinite(r[key])]
        if pts:
            ax.plot(*zip(*pts), style, label=label, markersize=3)
    ax.set_xscale("log")
    ax.set_xlabel("# training samples evaluated")
    ax.set_ylabel("lower bound per datapoint (ELBO)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return fig


def gradient_variance_figure(sweep: dict):
    """Trace of the gradient covariance against L (K for iwae), per estimator: encoder φ solid, decoder θ dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    counts = [r["num_latent_samples"] for r in sweep["results"]]
    for i, est in enumerate(sweep["estimators"]):
        color = f"C{i}"
        for part, style in (("encoder", "o-"), ("decoder", "s--")):
            ax.plot(
                counts,
                [r[est][f"{part}_variance"] for r in sweep["results"]],
                style,
                color=color,
                label=f"{est}: {part} ({'φ' if part == 'encoder' else 'θ'})",
                markersize=5,
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import NullFormatter

    ax.set_xticks(counts, [str(c) for c in counts])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("latent samples per example (L; K for iwae)")
    ax.set_ylabel("trace of the gradient covariance")
    ax.set_title(f"ELBO gradient variance, minibatch of {sweep['batch_size']}, {sweep['num_draws']} draws")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def write_figure(fig, uri: str, endpoint_url: Optional[str] = None) -> str:
    import matplotlib.pyplot as plt

    fs, path = storage.resolve(uri, endpoint_url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, _figure_bytes(fig))
    plt.close(fig)
    return path


# Each tile is drawn at least this many screen pixels wide and high (an 8×8 digit drawn 16 pixels wide,
# as the figure sized for 28×28 images did, is a striped texture in which no digit can be recognised).
MIN_TILE_PX = 48
BORDER_PX = 2
DPI = 110


def to_pixels(images: np.ndarray, shape: list[int]) -> np.ndarray:
    """Flat rows → [N, H, W, C] with C = 1 (gray) or 3 (color); a [C, H, W] or [H, W, C] shape with C = 3 is
    color, a flat shape is one row of pixels."""
    n = len(images)
    if len(shape) == 3 and shape[0] in (1, 3):  # channels first
        return images.reshape(n, *shape).transpose(0, 2, 3, 1)
    if len(shape) == 3 and shape[2] in (1, 3):
        return images.reshape(n, *shape)
    h, w = (shape[0], shape[1]) if len(shape) == 2 else (1, int(np.prod(shape)))
    return images.reshape(n, h, w, 1)


def tile_canvas(pixels: np.ndarray, cols: int) -> np.ndarray:
    """Tiles of [N, H, W, C], each scaled up by a whole factor to at least MIN_TILE_PX screen pixels, separated
    by BORDER_PX lines of mid gray: [rows, cols] of tiles as one RGB image."""
    n, h, w, c = pixels.shape
    scale = max(1, math.ceil(MIN_TILE_PX / min(h, w)))
    tiles = np.repeat(np.repeat(np.clip(pixels, 0, 1), scale, axis=1), scale, axis=2)
    tiles = np.repeat(tiles, 3, axis=3) if c == 1 else tiles
    th, tw = h * scale, w * scale
    rows = math.ceil(n / cols)
    canvas = np.full(
        (rows * (th + BORDER_PX) + BORDER_PX, cols * (tw + BORDER_PX) + BORDER_PX, 3), 0.5, dtype=np.float32
    )
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = BORDER_PX + r * (th + BORDER_PX), BORDER_PX + col * (tw + BORDER_PX)
        canvas[top : top + th, left : left + tw] = tiles[i]
    return canvas


def image_grid(images: np.ndarray, shape: list[int], cols: int, title: str):
    """A grid of images at one screen pixel per canvas pixel (the figure is sized to the canvas)."""
    import matplotlib.pyplot as plt

    canvas = tile_canvas(to_pixels(images, shape), cols)
    height, width = canvas.shape[:2]
    title_px = 30
    fig = plt.figure(figsize=(width / DPI, (height + title_px) / DPI), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, height / (height + title_px)))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    fig.suptitle(title, y=1 - 0.15 * title_px / (height + title_px), fontsize=9)
    return fig


def manifold_codes(n: int) -> torch.Tensor:
    """Figure 4: a grid of z whose coordinates are N(0, 1)'s inverse CDF at evenly spaced quantiles."""
    quantiles = torch.linspace(0.5 / n, 1 - 0.5 / n, n, dtype=torch.float64)
    coords = torch.distributions.Normal(0.0, 1.0).icdf(quantiles).float()
    zy, zx = torch.meshgrid(coords.flip(0), coords, indexing="ij")
    return torch.stack([zx.reshape(-1), zy.reshape(-1)], dim=1)


def plot_run(
    run_uri: str,
    output_uri: Optional[str] = None,
    *,
    endpoint_url: Optional[str] = None,
    seed: int = 0,
    data_uri: Optional[str] = None,
) -> list[str]:
    """Write the PNGs for a run folder; returns their URIs. `data_uri`: for a model of counts, the cells whose
    latents are drawn, colored by label and by each covariate."""
    import matplotlib

    matplotlib.use("Agg")

    fs, path = storage.resolve(run_uri, endpoint_url)
    rows = read_metrics(fs, f"{path}/metrics.csv")
    if not rows:
        raise ValueError(f"{run_uri}: no metrics.csv rows; is this a run folder made by `aevb-dist train`?")
    state_bytes, folder = load_checkpoint_bytes(run_uri, endpoint_url)
    vae, saved = model_from_bytes(state_bytes, folder)
    shape = saved.get("image_shape") or [vae.input_dim]
    out_uri = output_uri or storage.join(run_uri, "plots")
    name = run_uri.rstrip("/").rsplit("/", 1)[-1]
    figures = {"learning_curve.png": learning_curve(rows, f"{name}: Nz={vae.latent_dim}")}
    if vae.likelihood.models_counts:
        if data_uri is None:
            say("plot: a model of counts draws no images; pass --data DATA_URI to draw its cells' latents")
        else:
            figures.update(cell_figures(vae, saved, data_uri, endpoint_url, seed))
        return _written(figures, out_uri, endpoint_url)
    samples = vae.sample(100, generator=torch.Generator().manual_seed(seed)).numpy()
    figures["samples.png"] = image_grid(samples, shape, 10, f"samples from p(x|z), z ~ p(z) (step {rows[-1]['step']})")
    if vae.latent_dims == [2]:  # one stochastic layer of two latents
        means = vae.decode_mean(manifold_codes(20)).numpy()
        figures["manifold.png"] = image_grid(means, shape, 20, "learned 2-D manifold (Figure 4)")
    else:
        layers = " + ".join(str(d) for d in vae.latent_dims)
        say(f"plot: no manifold.png: the 2-D manifold (Figure 4) needs one layer of 2 latents; this model has {layers}")
    return _written(figures, out_uri, endpoint_url)


def _written(figures: dict, out_uri: str, endpoint_url: Optional[str]) -> list[str]:
    written = []
    for filename, fig in figures.items():
        write_figure(fig, storage.join(out_uri, filename), endpoint_url)
        written.append(storage.join(out_uri, filename))
    return written


MAX_PLOTTED_CELLS = 20_000  # the first row groups' cells, up to this many


def cell_figures(vae, saved: dict, data_uri: str, endpoint_url: Optional[str], seed: int) -> dict:
    """The cells' posterior means in 2-D (their first two principal components where Z > 2), colored by label
    and by each covariate: latents_by_label.png, latents_by_batch.png, ..."""
    from aevb_dist.eval.evaluation import encode_units, open_as_trained

    dataset = open_as_trained(data_uri, vae, saved, endpoint_url)
    dataset.check_fits_likelihood(vae.likelihood.name, data_uri)
    rows = np.cumsum([u.num_rows for u in dataset.units])
    units = list(range(int(np.searchsorted(rows, MAX_PLOTTED_CELLS)) + 1))[: len(dataset.units)]
    cells = encode_units(vae, dataset, units, binarization="none", seed=seed)
    means_N2, axes = principal_plane(cells["mean"])
    colorings = {}
    if "label" in cells:
        colorings["label"] = (cells["label"], dataset.label_names())
    for i, name in enumerate(dataset.covariate_columns if "covariates" in cells else []):
        colorings[name] = (cells["covariates"][:, i], dataset.covariates[name])
    if not colorings:
        say(f"plot: {data_uri} has neither labels nor covariates: latents.png is drawn in one color")
        colorings["cells"] = (np.zeros(len(means_N2), np.int64), None)
    return {
        f"latents_by_{key}.png" if key != "cells" else "latents.png": latent_scatter(
            means_N2, codes, names, axes, f"E_q[z|x] of {len(means_N2):,} cells by {key}"
        )
        for key, (codes, names) in colorings.items()
    }


def principal_plane(means_NZ: np.ndarray) -> tuple[np.ndarray, tuple[str, str]]:
    """2-D coordinates of the rows: as they are for Z = 2, else their projection on the first two principal axes."""
    if means_NZ.shape[1] <= 2:
        return means_NZ, ("z_1", "z_2")
    centered = means_NZ - means_NZ.mean(0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    return centered @ vt[:2].T, ("PC 1 of E_q[z|x]", "PC 2 of E_q[z|x]")


def latent_scatter(points_N2, codes_N, names: Optional[list[str]], axes: tuple[str, str], title: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for code in np.unique(codes_N):
        here = codes_N == code
        label = names[code] if names else str(code)
        ax.scatter(points_N2[here, 0], points_N2[here, 1], s=3, alpha=0.6, label=label, rasterized=True)
    if len(np.unique(codes_N)) <= 30:
        ax.legend(markerscale=4, fontsize=7, loc="best")
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(title)
    return fig
