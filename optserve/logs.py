"""How optserve's commands log: text for a terminal, or (`optserve server --log-format json`)
one JSON object a line for a cluster's log pipeline (Kubernetes, Loki, Cloud Logging, ...).

A JSON line has `time` (UTC, ISO 8601, milliseconds), `level`, `logger`, `message`, and
`exception` (the traceback) when there is one, plus any `extra=` fields of the call. In JSON
mode Python's warnings and uncaught exceptions (of any thread) are log records too, and so is
every line that anything else writes to the process's stderr: native libraries write to file
descriptor 2 directly (gRPC's C core: "E1203 12:00:00.000000 1 add_port.cc:83] Failed to add
port ..."), so fd 2 becomes a pipe whose lines a thread logs as records of the `stderr` logger.
"""
from __future__ import annotations

import atexit
import datetime
import faulthandler
import json
import logging
import os
import re
import sys
import threading

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# What every LogRecord has; anything else on a record came from `extra=` and is a field.
_RECORD_ATTRIBUTES = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JSONFormatter(logging.Formatter):
    """One JSON object per record, on one line (tracebacks are escaped into `exception`)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in entry:
                entry[key] = value
        # ASCII: a pipe or terminal of any encoding takes it; default=str for odd extras.
        return json.dumps(entry, default=str)


def json_line(logger: str, message: str, **fields) -> str:
    """An INFO record of `logger` as a JSON line, for what a command prints on stdout."""
    return JSONFormatter().format(logging.makeLogRecord(
        {"name": logger, "levelname": "INFO", "levelno": logging.INFO, "msg": message,
         **fields}))


def configure(log_format: str = "text", level: int = logging.INFO) -> None:
    """Logs to stderr in `log_format` (one of FORMATS)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
        _stderr_through_log(handler)
        logging.captureWarnings(True)   # warnings.warn -> the "py.warnings" logger
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread
    elif log_format == "text":
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    else:
        raise ValueError(f"log format {log_format!r}: choose from {', '.join(FORMATS)}")
    logging.basicConfig(level=level, handlers=[handler])


def _log_uncaught(exc_type, exc_value, exc_traceback) -> None:
    logging.getLogger("optserve.uncaught").critical(
        "uncaught exception", exc_info=(exc_type, exc_value, exc_traceback))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if issubclass(args.exc_type, SystemExit):   # as threading's own hook: silent
        return
    logging.getLogger("optserve.uncaught").critical(
        "uncaught exception in thread %s", args.thread.name if args.thread else "?",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


# glog-style lines of native libraries (gRPC's C core): a letter for the level, then MMDD.
_NATIVE_LEVEL = re.compile(r"^([IWEF])\d{4} ")
_NATIVE_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR,
                  "F": logging.CRITICAL}


def _stderr_through_log(handler: logging.StreamHandler) -> None:
    """Points `handler` at the real stderr and makes fd 2 a pipe whose lines a daemon thread
    writes through `handler`'s formatter, as records of the `stderr` logger. At exit fd 2 is
    the real stderr again and the thread drains the pipe. A crash's Python traceback
    (faulthandler) goes straight to the real stderr, so that it is not left in the pipe."""
    real = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    handler.setStream(real)
    faulthandler.enable(file=real)
    read_fd, write_fd = os.pipe()
    sys.stderr.flush()
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def pump() -> None:
        with open(read_fd, "rb") as pipe:
            for raw in pipe:
                text = raw.decode("utf-8", errors="replace").rstrip()
                if not text:
                    continue
                level = _NATIVE_LEVEL.match(text)
                record = logging.makeLogRecord({
                    "name": "stderr", "msg": text,
                    "levelno": _NATIVE_LEVELS[level.group(1)] if level else logging.WARNING,
                    "levelname": logging.getLevelName(
                        _NATIVE_LEVELS[level.group(1)] if level else logging.WARNING)})
                # Straight to the real stderr, not through logging: a handler that failed
                # would report it on fd 2, which is this pipe.
                handler.acquire()
                try:
                    real.write(handler.format(record) + "\n")
                except (OSError, ValueError):
                    pass
                finally:
                    handler.release()

    thread = threading.Thread(target=pump, name="optserve-stderr", daemon=True)
    thread.start()

    def restore() -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(real.fileno(), 2)   # the pipe's last writer closes: the thread reads its end
        thread.join(timeout=2.0)

    atexit.register(restore)
