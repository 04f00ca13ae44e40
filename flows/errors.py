"""Which failures are the user's to fix (one line, never retried) and which are worth a retry.

A bad manifest, a missing model, an unwritable or full output folder fail the same way on every
try: measured before this module, an out_dir that is a file was retried 3 times and reported in
~450 lines of tracebacks (Prefect logs each attempt's traceback, then the flow's). Those errors
already carry a message that names the item and what to do, so the CLI prints that one line, and
the Prefect run loggers drop the traceback for them. Anything else (a bug, a device hiccup) keeps
its traceback and, inside a task, its retries.
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

# By qualified name, so `xmodal search` (which imports neither torch nor mlflow) can use this module too:
# an exception's class is imported by the time it is raised.
USER_ERRORS = {"encoders.extract.ExtractionError", "encoders.frozen.BadInput", "encoders.frozen.EncoderUnavailable",
               "encoders.manifest.ManifestError", "encoders.store.format.StoreError", "flows.tracking.mlflow_store.StoreCreationError",
               "flows.tracking.runs.TrackingUnavailable", "flows.tracking.compare.UnknownExperiment",
               "projection.align.data.SplitTooSmall", "projection.engine.run_folder.RunFolderBusy",
               "pydantic_core._pydantic_core.ValidationError"}
# The file system says no, and will say it again: full, read-only, not a folder, not allowed, missing.
PERMANENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                    errno.EISDIR, errno.EEXIST, errno.ENOENT}


def is_user_error(exc: BaseException) -> bool:
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(exc).__mro__}
    return bool(names & USER_ERRORS) or (isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS)


def is_transient(exc: BaseException) -> bool:
    """Retry only what a second try could change (I/O hiccups, device errors); see retry_condition_fn."""
    return not is_user_error(exc) and not isinstance(exc, (ValueError, KeyError))


def one_line(exc: BaseException) -> str:
    """What went wrong, which file or item, what to do: the message the error already carries."""
    if isinstance(exc, OSError) and exc.errno in PERMANENT_ERRNOS:
        where = f" {exc.filename}" if exc.filename else ""
        return f"{exc.strerror or exc}:{where} (check the path, its permissions and free space, then rerun)"
    if hasattr(exc, "errors") and hasattr(exc, "error_count"):  # pydantic's ValidationError
        first = exc.errors()[0]
        field = ".".join(map(str, first["loc"])) or "input"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        return f"invalid {field}: {first['msg']}{more}"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class _DropExpectedTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and is_user_error(record.exc_info[1]):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_expected_tracebacks() -> None:
    """On Prefect's flow and task run loggers: the failure is logged as its message, without a traceback."""
    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropExpectedTraceback) for f in logger.filters):
            logger.addFilter(_DropExpectedTraceback())


def check_paths(**named: str | None) -> None:
    """Each given path must exist; the first that does not is named with its field (None: not given, skipped).

    Called on a flow's first line: a worker that cannot see a path fails the same way on every try, and measured
    before, a missing manifest failed 13-25 s into the run inside a traceback. The FileNotFoundError (ENOENT) is
    the user's to fix above: one line in the CLI, no retry, no traceback in the run log."""
    for field, path in named.items():
        if path and not Path(path).exists():
            # str(exc): "[Errno 2] manifest does not exist (working folder /srv/xmodal): 'data/m.csv'"
            raise FileNotFoundError(errno.ENOENT, f"{field} does not exist (working folder {Path.cwd()})", path)


# Every flow decorator takes these. Prefect 3.8 writes a failed flow run's exception to its result storage
# (~/.prefect/storage, PREFECT_LOCAL_STORAGE_PATH) whatever `persist_result` says, with the flow's result
# serializer: cloudpickle unless the flow names another. JSON stores the exception as its type's name and its
# message (all a reader needs; the traceback is in the run's logs). persist_result=False: a successful run's
# return value is passed in memory to its caller and never written (tests/flows/test_no_pickle_results.py).
FLOW_RESULTS = {"result_serializer": "json", "persist_result": False}
