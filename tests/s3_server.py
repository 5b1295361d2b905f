"""A real S3-compatible server (moto's server mode) on 127.0.0.1: the tests' fixture and the S3 benchmarks
start it the same way."""

import socket
import subprocess
import sys
import time


def start_moto(bucket: str, timeout_s: float = 30.0) -> tuple[subprocess.Popen, str]:
    """(the server's process, its endpoint URL), with `bucket` made; the caller terminates the process."""
    import s3fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    endpoint = f"http://127.0.0.1:{port}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True).mkdir(bucket)
    return proc, endpoint
