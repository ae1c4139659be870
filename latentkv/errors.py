"""The one exception type users see: a one-line message naming the problem and the fix."""


class LatentKVError(Exception):
    """Bad input or a broken file. The CLI prints `error: <message>` and exits with code 2."""
