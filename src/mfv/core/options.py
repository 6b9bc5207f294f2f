"""Options objects: one frozen, strictly checked model per stage, whose errors read as one line.

A stage's options are also a section of the run's settings (`mfv.runtime.settings`): each
field says how the user spells it (its alias, else its name: the flat name shared by the command
line, a settings file and Python keywords), its command-line flag and its help (`opt`). Fields
made with `internal` are the library's tuning knobs, not settings.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from mfv.core.errors import MfvError

_PLAIN = {  # pydantic error types → what to write instead
    "int_type": "must be a whole number", "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number", "float_type": "must be a number",
    "float_parsing": "must be a number", "bool_type": "must be true or false",
    "bool_parsing": "must be true or false", "string_type": "must be text (a string)",
    "tuple_type": "must be a list", "literal_error": "must be one of {expected}",
    "greater_than_equal": "must be at least {ge}", "less_than_equal": "must be at most {le}",
    "too_short": "must not be empty", "model_type": "must be a table of settings",
    "dict_type": "must be a table of settings",
}


def opt(default: Any, flag: str | None, help_text: str, **extra: Any) -> Any:
    """A setting's field: its default, command-line flag (None: not on the command line), help
    and `extra` (alias=, ge=, le=, min_length=, and for the command line: metavar=, repeat=,
    negate=, judges=)."""
    limits = {k: extra.pop(k) for k in ("alias", "ge", "le", "min_length") if k in extra}
    return Field(default, description=help_text, json_schema_extra={"flag": flag, **extra},
                 **limits)


def internal(default: Any, **limits: Any) -> Any:
    """A field that is the library's tuning knob, not a setting of a run."""
    return Field(default, json_schema_extra={"setting": False}, **limits)


def _named(value: Any) -> Any:
    if any(not v.strip() for v in ((value,) if isinstance(value, str) else value)):
        raise ValueError("must not be empty" if isinstance(value, str) else
                         "entries must not be empty")
    return value


Name = Annotated[str, AfterValidator(_named)]  # text that is not blank
Names = Annotated[tuple[str, ...], AfterValidator(_named)]  # a list of such


def count_or(word: str) -> Any:
    """A whole number of at least 1, or `word` ('auto', 'all'), checked with a message that
    says so."""

    def check(value: Any) -> Any:
        if value != word and (not isinstance(value, int) or isinstance(value, bool)):
            raise ValueError(f"must be a whole number or {word!r}")
        if value != word and value < 1:
            raise ValueError(f"must be at least 1, or {word!r}")
        return value

    return Annotated[int | Literal[word], BeforeValidator(check)]


def problem_text(problem: dict) -> str:
    """One validation problem in plain words, with the value given: 'must be at least 1 (got
    0)'."""
    template = _PLAIN.get(problem["type"])
    text = (template.format(**(problem.get("ctx") or {})) if template
            else problem["msg"].removeprefix("Value error, "))
    given = problem.get("input")
    shown = repr(given) if len(repr(given)) < 60 else type(given).__name__
    return f"{text} (got {shown})"


class OptionError(MfvError):
    """A bad option value; `problem` is pydantic's description of it (a section of the settings
    reads it to name the setting as the user wrote it)."""

    def __init__(self, message: str, problem: dict) -> None:
        super().__init__(message)
        self.problem = problem


class Options(BaseModel):
    """Base of the stages' options: frozen, strict (no '10' for 10), unknown names refused; a
    bad value is an `MfvError` naming the option."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, populate_by_name=True)

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            problem = exc.errors()[0]
            loc = [str(part) for part in problem["loc"]]
            field = type(self).model_fields.get(loc[0]) if loc else None
            name = ".".join([field.alias or loc[0], *loc[1:]] if field else loc) or "options"
            raise OptionError(f"{type(self).__name__}: {name} {problem_text(problem)}",
                              problem) from None

    @classmethod
    def flat_names(cls) -> dict[str, str]:
        """The fields that are settings: flat name (as the user spells it) → attribute."""
        return {info.alias or name: name for name, info in cls.model_fields.items()
                if (info.json_schema_extra or {}).get("setting", True)}
