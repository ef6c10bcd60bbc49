"""Name -> strategy class registry; the built-in rules register themselves on import."""

from __future__ import annotations

import re

from ..constants import check_send_back
from ..errors import StrategyRegistrationError, UnknownStrategyError
from .base import Strategy

_STRATEGIES: dict[str, type[Strategy]] = {}
_VALID_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make ``cls`` available as ``aggregate_adapters(..., strategy=cls.name)``.

    Raises:
        StrategyRegistrationError: ``cls`` is not a ``Strategy``, its ``name`` is not lower-case
            snake_case, the name is taken, it implements no rule, or its ``send_back`` is not a ``SendBackMethod``.
    """
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise StrategyRegistrationError(f"{cls!r} is not a subclass of hf_fedlora.strategies.Strategy.")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not _VALID_NAME.match(name):
        raise StrategyRegistrationError(
            f"{cls.__name__}.name must be a lower-case snake_case string, got {name!r}."
        )
    if name in _STRATEGIES and _STRATEGIES[name] is not cls:
        raise StrategyRegistrationError(
            f"a strategy named {name!r} is already registered ({_STRATEGIES[name].__name__}); choose another name."
        )
    if not cls.implements_rule():
        raise StrategyRegistrationError(
            f"{cls.__name__} must implement `aggregate_module`, or the incremental `fold_in` and `finish`."
        )
    try:
        check_send_back(cls.send_back, f"{cls.__name__}.send_back")
    except ValueError as exc:
        raise StrategyRegistrationError(str(exc)) from None
    _STRATEGIES[name] = cls
    return cls


def get_strategy(strategy: str | Strategy) -> Strategy:
    """An instance of the named strategy (an instance passes through).

    Raises:
        UnknownStrategyError: listing the registered names.
    """
    if isinstance(strategy, Strategy):
        return strategy
    if strategy not in _STRATEGIES:
        raise UnknownStrategyError(
            f"unknown aggregation strategy {strategy!r}; choose one of {list_strategies()} "
            "or register your own with `hf_fedlora.strategies.register_strategy`."
        )
    return _STRATEGIES[strategy]()


def list_strategies() -> list[str]:
    """Names of all registered strategies, sorted."""
    return sorted(_STRATEGIES)
