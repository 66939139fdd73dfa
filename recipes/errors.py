"""The one user-error type of lowbit: a setting that cannot work, with the key, the value and the fix.

It lives in the lowest package so that config, recipe and data code (``recipes/``
and ``train/``) raise the same type; the entry point prints any of them as one
line, ``lowbit: config error: <key>=<value>: <fix>``, and exits with code 2
before any heavy start-up (``train.cli.config_error_exit``).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """``key`` is the dotted config key (``recipe.block_size``), ``fix`` says what to do."""

    def __init__(self, key: str, value: object, fix: str):
        super().__init__(f"{key}={value}: {fix}")
        self.key, self.value, self.fix = key, value, fix

    def one_line(self) -> str:
        return f"lowbit: config error: {self.key}={self.value}: {self.fix}"
