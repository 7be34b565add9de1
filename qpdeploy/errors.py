"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class QPDeployError(Exception):
    """A user-facing error: bad input, a missing file, an incompatible artifact.

    The message is a single line that names the problem (the path, the value, the
    expected form). The CLI prints it as ``error: <message>`` and exits with code 2.
    """
