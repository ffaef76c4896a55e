"""Registry of pretraining methods: ``cass pretrain --method NAME`` looks names up here."""

from __future__ import annotations

from collections.abc import Callable

from cass.config import ConfigError, PretrainConfig
from cass.methods.base import PretrainMethod

METHODS: dict[str, type[PretrainMethod]] = {}


def register_method(name: str) -> Callable[[type[PretrainMethod]], type[PretrainMethod]]:
    """Class decorator adding a method under ``name``."""

    def add(cls: type[PretrainMethod]) -> type[PretrainMethod]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        cls.name = name
        METHODS[name] = cls
        return cls

    return add


def method_class(name: str, option: str = "--method") -> type[PretrainMethod]:
    """The registered class of a method, or an error naming the option and the methods available."""
    import cass.methods  # noqa: F401  (importing the package registers every method)

    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"{option}: unknown method {name!r}; available: {', '.join(sorted(METHODS))}") from None


def method_names() -> list[str]:
    """Every registered method, in registration order."""
    import cass.methods  # noqa: F401

    return list(METHODS)


def create_method(cfg: PretrainConfig) -> PretrainMethod:
    """Instantiate the method named by ``cfg.method`` (its constructor checks its options first)."""
    return method_class(cfg.method)(cfg)
