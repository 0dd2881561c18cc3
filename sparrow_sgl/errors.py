"""The one exception type for input a person can fix; `sparrow` prints its message on one line, no traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration, schedule or input file that cannot be used; the message names the problem."""
