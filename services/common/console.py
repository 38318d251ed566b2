"""The console and the log files: Tribune's own lines on the terminal, everything in the file.

Without ``-v`` the terminal shows Tribune's records (one line per stage) and errors from
anywhere; libraries' records (transformers' load reports, accelerate), Python warnings
(``logging.captureWarnings``) and nothing else go only to a run's log file. transformers'
own stderr handler and its weight-loading/saving progress bars are switched off, its
records propagate here instead. ``-v`` shows every record and the bars again. Console
lines are written with ``tqdm.write`` so they never break a progress bar.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

FORMAT = "[tribune] %(asctime)s %(levelname)s %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE = "%H:%M:%S"
# libraries whose INFO records are noise even in the log file
CHATTY = ("httpx", "urllib3", "PIL", "matplotlib", "filelock", "accelerate", "fsspec", "h5py")


class TqdmHandler(logging.StreamHandler):
    """A stream handler that prints above any open tqdm bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # logging's own contract: a failing handler reports and carries on
            self.handleError(record)


class OwnRecords(logging.Filter):
    """Tribune's records, and errors from any logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "tribune" or record.name.startswith("tribune.") or record.levelno >= logging.ERROR


def setup_console(verbose: bool) -> None:
    """Once per process, by the command line, before any stage runs."""
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    console = TqdmHandler(sys.stderr)
    console.setFormatter(logging.Formatter(FORMAT, datefmt=DATE))
    if not verbose:
        console.addFilter(OwnRecords())
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(console)
    logging.captureWarnings(True)
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    _route_transformers(verbose)
    if "torch" in sys.modules:   # torch installs its own stderr handler at import
        _adopt("torch")


def _adopt(name: str) -> None:
    """Library loggers (``name`` and below) that write to stderr themselves: through the
    handlers here instead. torch puts a handler on each of its registered loggers."""
    for qualified, logger in list(logging.Logger.manager.loggerDict.items()):
        if (qualified == name or qualified.startswith(name + ".")) and isinstance(logger, logging.Logger) \
                and logger.handlers:
            for h in list(logger.handlers):
                logger.removeHandler(h)
            logger.propagate = True


def _route_transformers(verbose: bool) -> None:
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:   # an install without transformers has nothing to route
        return
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    hf_logging.set_verbosity(logging.INFO if verbose else logging.WARNING)
    if verbose:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()


_file_handler: logging.Handler | None = None


def log_to_file(path: Path | None) -> None:
    """Every record of the process (all loggers, warnings) also goes to ``path`` from now on,
    replacing the previous run's file; None stops file logging."""
    global _file_handler
    root = logging.getLogger()
    if _file_handler is not None:
        root.removeHandler(_file_handler)
        _file_handler.close()
        _file_handler = None
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _file_handler = logging.FileHandler(path, encoding="utf-8")
    _file_handler.setFormatter(logging.Formatter(FILE_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
    root.addHandler(_file_handler)
