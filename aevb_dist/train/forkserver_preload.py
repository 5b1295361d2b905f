"""Imported by local mode's fork server only (multiprocessing's forkserver preload), never by the
command's own process: the modules every worker needs, loaded once before the workers are forked."""

import atexit
import os

import torch._dynamo  # noqa: F401  (every torch optimizer's constructor imports it on first use: ~1 s a worker)
import torch.distributed  # noqa: F401

try:
    import torch.utils.tensorboard  # noqa: F401  (rank 0's RunLog)
except ImportError:  # optional
    pass

import aevb_dist.train.local_launcher  # noqa: F401  (the worker entry point and everything it imports)

# The server holds nothing but these imports. When the command exits, the server ends with
# SystemExit and would spend ~0.7 s tearing torch down while still holding the command's
# stderr open (anyone reading it, a pipe or a CI log, waits). Its forked workers always leave by
# os._exit, so they never run this.
atexit.register(os._exit, 0)
