"""Parameter values that need no conversion skip typer's pydantic adapters.

typer (0.29) coerces every value of the command being run, its defaults included, through a
pydantic TypeAdapter built for each parameter: importing pydantic and typer's adapters and
building ~20 adapters is ~0.05 s of every `vmkeep backup` on a quiet machine, more cold
(docs/DATA-PATH.md "Start-up of backup and restore"). A value that already has its
parameter's plain type (a `str` for a str, an `int` within min/max for an int, a `float`
for a float, a `bool` for a bool) comes out of those adapters unchanged, so it is passed
through here; anything else (a number or path typed on the command line, a parser, a
choice, a file, a list) goes to typer's own coercion, built when first needed. Installed
once by app.py; if typer's internals are not the expected ones, nothing is changed."""

from __future__ import annotations

from typing import Any

PLAIN = (str, int, float, bool)


def install() -> None:
    """Wrap typer's `build_runtime_param` (typer.core) with the pass-through."""
    try:
        from typer import _coercion, core
    except ImportError:
        return
    original = getattr(core, "build_runtime_param", None)
    base = getattr(_coercion, "RuntimeParam", None)
    if original is None or base is None or getattr(original, "_vmkeep_plain", False):
        return
    param_class = _lazy_param_class(base, original)

    def build(descriptor: Any) -> Any:
        return param_class(descriptor.parameter_info, descriptor.annotation, descriptor)

    build._vmkeep_plain = True  # type: ignore[attr-defined]
    setattr(core, "build_runtime_param", build)  # noqa: B010 (not exported by typer.core)


def plain_descriptor(descriptor: Any) -> bool:
    """A str, int, float or bool parameter with no parser and no file behind it."""
    info = descriptor.parameter_info
    return (
        descriptor.annotation in PLAIN
        and getattr(descriptor, "file_annotation", None) is None
        and getattr(info, "parser", None) is None
    )


def unchanged(value: Any, annotation: type, info: Any) -> bool:
    """Whether typer's adapter would return `value` itself (same type, within min/max)."""
    if type(value) is not annotation:
        return False
    if annotation in (int, float):
        low, high = getattr(info, "min", None), getattr(info, "max", None)
        return (low is None or value >= low) and (high is None or value <= high)
    return True


def _lazy_param_class(base: type, original: Any) -> type:
    """A RuntimeParam subclass (typer's class, made here: it is private to typer). typer
    builds one per parameter of the command run, its value given or not; this one builds
    typer's own (and its adapter) only for a value that is not passed through. None never
    reaches `_coerce_value` (RuntimeParam.coerce answers it, for every kind of parameter)."""

    class LazyParam(base):  # type: ignore[misc]
        def __init__(self, parameter_info: Any, annotation: Any, descriptor: Any) -> None:
            super().__init__(parameter_info, annotation)
            object.__setattr__(self, "_descriptor", descriptor)
            object.__setattr__(self, "_plain", plain_descriptor(descriptor))
            object.__setattr__(self, "_full", None)

        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            if self._plain and unchanged(value, self.annotation, self.parameter_info):
                return value
            if self._full is None:
                object.__setattr__(self, "_full", original(self._descriptor))
            return self._full._coerce_value(value, param=param, ctx=ctx)

    return LazyParam
