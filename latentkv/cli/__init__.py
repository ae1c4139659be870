"""`latentkv` command line: one subcommand per library verb; errors are one line, exit code 2.

The library logs through the `latentkv` logger and `warnings`; here both go to stderr, one line
each (`warning: ...` for warnings), at the level -q/-v choose. Results go to stdout, as text or
(--json) exactly one JSON object.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import warnings

from transformers.utils import logging as hf_logging

from ..errors import LatentKVError, write_error
from .parser import build_parser
from .printers import print_result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command = "latentkv " + " ".join(sys.argv[1:] if argv is None else argv)
    args.progress = not args.quiet
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    with _messages_to_stderr(level), _hub_progress(enabled=not args.quiet):
        code = _run(args)
        if code is not None:
            return code
    if getattr(args, "silent", False):  # a non-zero rank of a distributed run
        return 0
    if args.json:
        print(json.dumps(args.result, default=str))
    else:
        print_result(args.cmd, args.result, args.command)
    return getattr(args, "exit_code", 0)


def _run(args) -> int | None:
    """Run the subcommand into args.result; -> an exit code when it failed in a way we report."""
    try:
        args.result = args.fn(args)
    except LatentKVError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no partial output was kept", file=sys.stderr)
        return 130
    except OSError as e:
        if write_error(e) is None:
            raise
        print(f"error: {write_error(e)}", file=sys.stderr)
        return 2
    return None


class _OneLine(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        return f"warning: {msg}" if record.levelno >= logging.WARNING else msg


@contextlib.contextmanager
def _messages_to_stderr(level: int):
    """While inside: `latentkv` log records at `level` and up, and warnings, print to stderr; the
    logger's level, handlers and the warnings machinery are put back on the way out."""
    logger = logging.getLogger("latentkv")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_OneLine())
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    # the hub client logs each failed request ("... thrown while requesting HEAD ...") before raising;
    # our one-line error names the failure and its fix, so that line is noise unless --verbose
    hub = logging.getLogger("huggingface_hub")
    old_hub = hub.level
    if level > logging.DEBUG:
        hub.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = lambda message, *rest: print(f"warning: {message}", file=sys.stderr, flush=True)
            yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        logger.propagate = old_propagate
        hub.setLevel(old_hub)


@contextlib.contextmanager
def _hub_progress(enabled: bool):
    """transformers' own progress bars (loading weights) follow --quiet too, and come back afterwards."""
    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()
