"""Errors that reach a person. Each message is one sentence: the file or field, what is wrong, what to do."""

from __future__ import annotations


class LoraStudioError(Exception):
    """Base of every error the app shows as-is (no traceback) in the UI and the CLI."""


class ModelLoadError(LoraStudioError):
    """A base model could not be found, read or recognised."""


class StoppedEarly(LoraStudioError):
    """The person pressed Stop before training began (while regularization images rendered): nothing to save."""


class ConfigError(LoraStudioError):
    """A config or preset has one or more bad fields; `problems` lists every one of them."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} has {len(problems)} problem(s):\n{lines}")
