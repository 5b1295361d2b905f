"""The run folder and what it holds: storage (URIs, filesystems, retried writes), verified checkpoints,
metrics.csv and the progress read from it, the one-writer lease."""
