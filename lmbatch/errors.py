"""What goes wrong, by whom it is told: a bad job (`JobError`, one line before anything runs), a job that
fails while it runs (`JobFailed`), and a bad row (`RowError`, which becomes an error row, never raised out
of its chunk). An error row's message starts with its kind (`too long: ...`), which `error_kind` reads.
"""

from __future__ import annotations


class JobError(Exception):
    """The job cannot run as configured; the message is meant for the user, without a traceback."""


class JobFailed(RuntimeError):
    """The job failed while it ran (a replica could not load the model, a part could not be
    written, parts went missing): the message is one line on the cause; committed chunks stay."""


class RowError(ValueError):
    """This row cannot be generated; the message goes to the output's `error` column."""


FAILED_IN_GENERATION = ("out of memory", "generation failed", "crashed")
"""Error kinds of rows that failed in generation, not for their input: another try may succeed
(output.mode=retry_errors), where a row too long or without a prompt fails the same way again."""


def error_kind(message: str) -> str:
    """Error messages start with their kind: 'too long: prompt has ...' -> 'too long'."""
    return message.split(":", 1)[0]
