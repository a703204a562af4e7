"""Errors a user can cause, and how every command and worker reports them.

Owns: ``UserError`` (the base of ``ConfigError``, ``DataError`` and ``CheckpointError``), the one
exit code they end a process with (``EXIT_CODE_USER_ERROR``) and ``report_user_error``, which
prints one line: ``longtrain: <kind> error: <what is wrong and what to change>``.

The idea: an error the user caused -- a setting, a file, a checkpoint -- cannot succeed when
retried, so it is not a crash. It ends the process with its own exit code, which every launcher
reads as "do not restart" (a crash, a kill or a lost node still restarts the group), and its
message is one line that names the setting or file and the fix, never a traceback.
"""

from __future__ import annotations

import sys

# argparse's code for a usage error: a bad command line is the same kind of mistake. A worker that
# exits with it is not restarted by any launcher.
EXIT_CODE_USER_ERROR = 2


class UserError(Exception):
    """A problem the user can fix; the message says what to change. ``kind`` labels its line."""

    kind = "input"


def user_error_line(err: UserError, prog: str = "longtrain") -> str:
    """``prog: <kind> error: <message>`` on one line (a message's line breaks become '; ')."""
    text = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return f"{prog}: {err.kind} error: {text}"


def report_user_error(err: UserError, prog: str = "longtrain") -> int:
    """Print the error's one line to stderr; return ``EXIT_CODE_USER_ERROR``."""
    print(user_error_line(err, prog), file=sys.stderr, flush=True)
    return EXIT_CODE_USER_ERROR
