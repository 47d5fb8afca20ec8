"""The two ways an ltcli command can fail, mapped to exit codes by the CLI."""


class LtcliError(Exception):
    """Bad usage or bad input: the CLI prints the one-line message and exits 2.

    The message must name the culprit (file, file:line, or --option)."""


class JobFailed(Exception):
    """The job itself failed (not the user's input): exit 1."""


def check_seed(seed: int) -> None:
    """--seed feeds numpy and torch generators, which take 0 <= seed < 2**63."""
    if not 0 <= int(seed) < 2**63:
        raise LtcliError(f"--seed {seed}: must be between 0 and 2**63 - 1")
