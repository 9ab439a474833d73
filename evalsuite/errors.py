"""One exception family; `cli.main` maps it to exit codes in one place.

Every message is one line that names the cause and what to do about it, because a user who
started an hour-long GPU run deserves better than a traceback.
"""

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_RUN_ERROR = 3
EXIT_PARTIAL = 4  # results were written, but a part of the run failed (a dtype, the benchmarks, ...)
EXIT_INTERRUPTED = 130  # SIGINT
EXIT_TERMINATED = 143  # SIGTERM


class EvalsuiteError(Exception):
    """Base of all errors a user can cause or fix. `exit_code` is what the CLI returns."""

    exit_code = EXIT_RUN_ERROR


class UsageError(EvalsuiteError):
    """Bad command line or configuration (unknown dtype, malformed option)."""

    exit_code = EXIT_USAGE


class ModelLoadError(EvalsuiteError):
    """The checkpoint or tokenizer is missing, corrupt or cannot be loaded."""


class CorpusError(EvalsuiteError):
    """The evaluation text is missing, empty, undecodable or too short."""


class MissingExtraError(EvalsuiteError):
    """An optional dependency is not installed; the message says which extra brings it."""


class ResultsError(EvalsuiteError):
    """A results file is missing, corrupt, or from an unsupported schema version."""

    exit_code = EXIT_USAGE
