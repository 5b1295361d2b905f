"""What the fault-injection tests share: a run slow enough to interrupt, waiting for it, finding its
processes, and checking what it left behind."""

import os
import time

import psutil

from aevb_dist.run import storage
from aevb_dist.run.metrics import read_metrics

# A run slow enough to be interrupted part way: wider layers, many steps, and every epoch's row groups read
# from storage again, as for a dataset larger than data.decoded_cache_mib (tiny data kept in memory trains so
# fast that the run would end before a test could interrupt it).
SLOW = {
    "model.hidden_sizes": "[256,256]",
    "train.batch_size_per_worker": 64,
    "train.max_steps": 600,
    "train.log_every_steps": 10,
    "train.eval_every_steps": 0,
    "checkpoint.every_steps": 100,
    "data.decoded_cache_mib": 0,
}


def wait_for(predicate, timeout=120.0, interval=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    raise TimeoutError("condition not reached")


def logged_step(run_dir: str) -> int:
    fs, path = storage.resolve(run_dir)
    try:
        rows = read_metrics(fs, f"{path}/metrics.csv")
    except Exception:
        return 0
    return rows[-1]["step"] if rows else 0


def our_train_workers():
    me = psutil.Process(os.getpid())
    return [p for p in me.children(recursive=True) if "RayTrainWorker" in " ".join(_cmdline(p)[:1])]


def check_metrics_contiguous(run_dir: str, every: int, last: int) -> None:
    fs, path = storage.resolve(run_dir)
    steps = [r["step"] for r in read_metrics(fs, f"{path}/metrics.csv")]
    assert steps == [1, *range(every, last + 1, every)], steps


def our_local_workers():
    """Local mode's worker processes: children of this process's fork server."""
    servers = [p for p in psutil.Process(os.getpid()).children() if "forkserver" in " ".join(_cmdline(p))]
    return [c for s in servers for c in s.children()]


def _cmdline(process: psutil.Process) -> list[str]:
    """A child's command line; none for one that has exited (a zombie another test has not reaped yet)."""
    try:
        return process.cmdline()
    except (psutil.ZombieProcess, psutil.NoSuchProcess):
        return []


def capture_errors(errors, fn, *args):
    try:
        fn(*args)
    except BaseException as err:  # noqa: BLE001 - reported to the test thread
        errors.append(err)


class StorageLink:
    """A TCP relay on 127.0.0.1 in front of a storage server, that can be cut and restored: the server keeps
    its state (an in-memory S3 server restarted would lose its buckets), while every client sees what a
    real outage shows it, connections refused and open ones reset."""

    def __init__(self, target_port: int):
        import socket
        import threading

        self._socket, self._threading = socket, threading
        self.target_port = target_port
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._open: list = []
        self._lock = threading.Lock()
        self._listener = None
        self.restore()

    def restore(self) -> None:
        listener = self._socket.socket()
        listener.setsockopt(self._socket.SOL_SOCKET, self._socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        listener, self._listener = self._listener, None
        listener.close()
        with self._lock:
            for conn in self._open:
                try:
                    conn.shutdown(self._socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()
            self._open.clear()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # cut
                return
            server = self._socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._open += [client, server]
            for a, b in ((client, server), (server, client)):
                self._threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for conn in (src, dst):
                try:
                    conn.close()
                except OSError:
                    pass
