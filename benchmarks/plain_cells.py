"""The hand-written ceiling for single-cell training, written without aevb_dist's code: scVI's model (one hidden
layer of 128 ReLU units each way, 10 latents, a negative binomial with one inverse dispersion per gene, mean =
observed library size × softmax, encoder on log(1 + counts), both networks conditioned on the batch's one-hot
code) trained with Adam 1e-3 on an in-memory CSR matrix, each shuffled batch of 128 made dense as it is used.

    python benchmarks/plain_cells.py TRAIN.npz BATCH_CODES.npy NUM_BATCHES EPOCHS

Prints one JSON line: steady cells/s (the epochs after the first), the seconds of each epoch, the last train ELBO.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
from scipy import sparse
from torch import nn
from torch.nn import functional as F


class NBVAE(nn.Module):
    def __init__(self, genes: int, batches: int, hidden: int = 128, latent: int = 10):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(genes + batches, hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent))
        self.decoder = nn.Sequential(nn.Linear(latent + batches, hidden), nn.ReLU(), nn.Linear(hidden, genes))
        self.log_theta = nn.Parameter(torch.zeros(genes))

    def elbo(self, x: torch.Tensor, batch_one_hot: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.encoder(torch.cat([torch.log1p(x), batch_one_hot], 1)).chunk(2, 1)
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        logits = self.decoder(torch.cat([z, batch_one_hot], 1))
        log_mean = torch.log(x.sum(1, keepdim=True).clamp_min(1.0)) + F.log_softmax(logits, 1)
        log_theta = self.log_theta
        theta = log_theta.exp()
        log_theta_mean = torch.logaddexp(log_theta, log_mean)
        log_nb = (
            theta * (log_theta - log_theta_mean)
            + x * (log_mean - log_theta_mean)
            + torch.lgamma(x + theta)
            - torch.lgamma(theta)
            - torch.lgamma(x + 1)
        ).sum(1)
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)
        return log_nb - kl


def dense_rows(matrix: sparse.csr_matrix, rows: np.ndarray) -> torch.Tensor:
    part = matrix[rows]
    return torch.sparse_csr_tensor(
        torch.from_numpy(part.indptr.astype(np.int64)),
        torch.from_numpy(part.indices.astype(np.int64)),
        torch.from_numpy(part.data.astype(np.float32)),
        size=part.shape,
    ).to_dense()


def main() -> None:
    path, codes_path, num_batches, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    matrix = sparse.load_npz(path).tocsr()
    one_hot = F.one_hot(torch.from_numpy(np.load(codes_path)).long(), num_batches).float()
    torch.manual_seed(0)
    model = NBVAE(matrix.shape[1], num_batches)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    ends, elbo = [time.perf_counter()], float("nan")
    for _ in range(epochs):
        order = rng.permutation(matrix.shape[0])
        for start in range(0, len(order), 128):
            rows = np.sort(order[start : start + 128])
            loss = -model.elbo(dense_rows(matrix, rows), one_hot[rows]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            elbo = -loss.item()
        ends.append(time.perf_counter())
    steady = (epochs - 1) * matrix.shape[0] / (ends[-1] - ends[1]) if epochs > 1 else float("nan")
    print(json.dumps({"cells_per_s": steady, "epoch_s": np.diff(ends).round(2).tolist(), "train_elbo": elbo}))


if __name__ == "__main__":
    main()
