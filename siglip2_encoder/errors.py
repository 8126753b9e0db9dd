"""Errors that name the caller's arguments in the caller's own words: a Python caller reads ``resume=True``, the
command line ``--resume``. The library raises :class:`ArgumentError` with the arguments marked (:class:`Arg`); its
``str`` spells them as Python keywords, and the command line re-spells them with its flags (:meth:`spelled`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Arg", "ArgumentError"]


@dataclass(frozen=True)
class Arg:
    """An argument named in a message: its Python parameter and how a Python caller writes it there."""

    name: str  # the parameter, e.g. "resume"
    python: str  # e.g. "resume=True"


class ArgumentError(ValueError):
    """A call whose arguments do not fit (an existing output, settings that differ on resume, ...).

    Args:
        parts: the message, text and :class:`Arg` marks in order.
    """

    def __init__(self, *parts: str | Arg) -> None:
        self.parts = parts
        super().__init__(self.spelled({}))

    def spelled(self, spellings: Mapping[str, str]) -> str:
        """The message with each marked argument as ``spellings`` writes it (by parameter name), else as Python."""
        return "".join(p if isinstance(p, str) else spellings.get(p.name, p.python) for p in self.parts)
