"""The `aevb-dist` command: arguments parsed (`parser.py`), the command run (`commands.py`). A user mistake
prints one line and exits 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

from aevb_dist.cli.parser import build_parser
from aevb_dist.cluster import compat
from aevb_dist.console import Interrupted, is_user_error


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` overrides may come after options (`submit CONFIG --address URL train.max_steps=9`).
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    before = _sigterm_as_interrupt()
    try:
        return args.func(args)
    except Exception as err:
        if args.debug or not is_user_error(err):
            raise
        cause = getattr(err, "cause", None) or err  # a Ray task's error carries the original as .cause
        message = str(cause).strip().splitlines()
        print(f"aevb-dist {args.command}: error: {message[0] if message else type(cause).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: 128 + the signal's number (console.Interrupted)
        if not getattr(err, "told", False):
            print(f"aevb-dist {args.command}: interrupted", file=sys.stderr)
        return err.exit_status if isinstance(err, Interrupted) else 128 + signal.SIGINT
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)


def _sigterm_as_interrupt():
    """SIGTERM ends the command at any stage as Ctrl-C does (a run's own handler, once training starts,
    checkpoints the next step instead: train/stop_request.py); the handler it replaced, or None."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise Interrupted(signum)

    return signal.signal(signal.SIGTERM, interrupt)


def console_main() -> None:
    """The `aevb-dist` command: `main`, then a quick exit. Tearing down an interpreter that has torch,
    pyarrow and Ray loaded takes ~0.5 s after the work is done and every file is closed; the command skips
    it once the exit handlers have run (multiprocessing's, logging's) and no thread of ours is running."""
    code = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (BrokenPipeError, ValueError):  # a reader that has gone away, a closed stream: exit the usual way
        raise SystemExit(code) from None
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        raise SystemExit(code)  # the interpreter's exit joins them
    # Ray's own exit handler disconnects from the cluster, and waits forever for a head that stopped
    # answering: the handlers get a bounded time, then the command exits all the same (its files are closed).
    handlers = threading.Thread(target=compat.run_exit_handlers, name="aevb-exit-handlers", daemon=True)
    handlers.start()
    handlers.join(EXIT_HANDLERS_S)
    if handlers.is_alive():
        print(
            f"aevb-dist: exit handlers (Ray's disconnect) did not finish within {EXIT_HANDLERS_S:g} s; "
            "exiting without them",
            file=sys.stderr,
            flush=True,
        )
    os._exit(code)


EXIT_HANDLERS_S = 10.0


if __name__ == "__main__":
    console_main()
