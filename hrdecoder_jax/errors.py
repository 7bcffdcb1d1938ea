"""The base class of every expected failure: what a command reports as one line ``error: <what>``.

A library module raises a subclass of ``ExpectedError`` (``ConfigError``, ``CheckpointError``,
``WeightImportError``, ``DatasetError``, ``WorkdirError``, ``CommandError``) when the input, not the code,
is at fault; the message is the whole story. ``cli`` knows the expected errors by this class alone, so it
imports none of the modules that raise them. Anything else is reported as unexpected, with a hint to
rerun with ``--verbose``.
"""


class ExpectedError(Exception):
    """An expected failure; its message is one line naming what is wrong and where."""


class CommandError(ExpectedError):
    """An expected failure of a command (a flag or file it cannot use); the message is the whole story."""
