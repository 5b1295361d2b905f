"""A real MLflow tracking server on 127.0.0.1 (`mlflow server`), with its SQLite store and artifacts in a folder
of the test's: started, stopped (its whole process group: uvicorn and its job consumers) and started again on
the same port and store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from tests.helpers import free_port


class MlflowServer:
    def __init__(self, folder: str):
        self.folder, self.port = folder, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90.0) -> "MlflowServer":
        mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
        self._proc = subprocess.Popen(
            [
                mlflow if os.path.exists(mlflow) else "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{self.folder}/mlflow.db",
                "--artifacts-destination",
                f"{self.folder}/artifacts",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.folder, "server.log"), "ab"),
            start_new_session=True,  # its own process group: stopped whole, by the id we started
        )
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.answers():
                return self
            if self._proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self._proc.returncode}; see {self.folder}/server.log")
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"mlflow server did not answer within {timeout_s} s")

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, signal.SIGKILL)  # the group we started: the server and its children
        except ProcessLookupError:
            pass
        self._proc.wait(timeout=30)
        self._proc = None
