"""Errors meant for people: one sentence naming the field or file, what is wrong, what to do."""

from __future__ import annotations


class FlywheelError(Exception):
    """A problem with the user's input. The CLI prints it without a traceback and exits 2."""

    exit_code = 2


class ConfigError(FlywheelError):
    """A config that does not validate; carries one line per problem."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(problems))
