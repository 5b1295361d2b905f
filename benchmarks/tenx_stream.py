"""Reading a Cell Ranger matrix.mtx.gz cell chunk by cell chunk, against scipy reading it whole.

    python benchmarks/tenx_stream.py [--cells 30000] [--genes 2000] [--rounds 3]

Writes a seeded synthetic atlas as a 10x folder (entries barcode by barcode, as Cell Ranger writes them), then
runs, in fresh processes and alternated, (a) `count_sources.read_10x(...).chunks(10_000)`: the streaming reader
`aevb-dist prepare` uses, and (b) the ceiling written without aevb_dist's code: `scipy.io.mmread` of the whole
file (scipy's multi-threaded fast_matrix_market) and its conversion to cells × genes CSR, sliced into the same
chunks. Prints each one's seconds and peak RSS (the child's VmHWM: getrusage would count the parent's, as
Linux keeps ru_maxrss across exec), and the medians of their ratios.
Run by hand, not in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STREAM = """
import json, sys, time
started = time.perf_counter()
from aevb_dist.data import count_sources
matrix = count_sources.read_10x(sys.argv[1], [])
entries = sum(chunk.nnz for _, chunk in matrix.chunks(10_000))
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"s": time.perf_counter() - started, "entries": entries, "rss_mb": int(hwm) / 1024}))
"""

WHOLE = """
import gzip, json, os, sys, time
started = time.perf_counter()
from scipy import io, sparse
with gzip.open(os.path.join(sys.argv[1], "matrix.mtx.gz"), "rb") as f:
    matrix = sparse.csr_matrix(io.mmread(f).T)
entries = sum(matrix[a : a + 10_000].nnz for a in range(0, matrix.shape[0], 10_000))
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"s": time.perf_counter() - started, "entries": entries, "rss_mb": int(hwm) / 1024}))
"""


def measure(code: str, folder: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, folder], capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, default=30_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, REPO)
    from tests import atlas as atlases

    with tempfile.TemporaryDirectory(prefix="aevb-10x-") as tmp:
        atlas = atlases.synthetic_atlas(num_cells=args.cells, num_genes=args.genes, seed=1, mean_library=2000)
        folder = atlases.write_10x(atlas, os.path.join(tmp, "tenx"))
        size_mb = os.path.getsize(os.path.join(folder, "matrix.mtx.gz")) / 2**20
        entries = atlas.counts.nnz
        del atlas
        print(f"{args.cells:,} cells × {args.genes:,} genes, {entries:,} entries, matrix.mtx.gz {size_mb:.0f} MB")
        ratios_s, ratios_rss = [], []
        for round_ in range(args.rounds):
            order = [("stream", STREAM), ("whole", WHOLE)]
            results = dict((name, measure(code, folder)) for name, code in (order if round_ % 2 == 0 else order[::-1]))
            assert results["stream"]["entries"] == results["whole"]["entries"] == entries
            ratios_s.append(results["stream"]["s"] / results["whole"]["s"])
            ratios_rss.append(results["stream"]["rss_mb"] / results["whole"]["rss_mb"])
            stream, whole = results["stream"], results["whole"]
            print(
                f"round {round_}: streamed {stream['s']:.2f} s, peak RSS {stream['rss_mb']:.0f} MB;"
                f" scipy whole {whole['s']:.2f} s, peak RSS {whole['rss_mb']:.0f} MB"
            )
        print(
            f"streamed / whole: seconds {statistics.median(ratios_s):.2f}×, "
            f"peak RSS {statistics.median(ratios_rss):.2f}× (medians over rounds)"
        )


if __name__ == "__main__":
    main()
