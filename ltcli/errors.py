"""The two ways an ltcli command can fail, mapped to exit codes by the CLI."""


class LtcliError(Exception):
    """Bad usage or bad input: the CLI prints the one-line message and exits 2.

    The message must name the culprit (file, file:line, or --option)."""


class JobFailed(Exception):
    """The job itself failed, not the user's input (a full disk, a diverged or NaN training, a
    worker crash): the CLI prints `ltcli: failed: <message>` and exits 1. The message names the
    file or option concerned."""
