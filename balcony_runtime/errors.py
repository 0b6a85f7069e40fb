"""Errors the runtime raises on purpose, so callers can tell them from bugs."""


class BalconyError(Exception):
    """Base of every error with a message meant for the user."""


class ModelSourceError(BalconyError):
    """A model source that cannot be resolved or loaded (missing path, unsupported architecture)."""


class AdapterError(BalconyError):
    """Adapters that are missing, corrupt, or made for another backbone."""


class RequestError(BalconyError):
    """A request the engine cannot serve as asked (too long, unknown exit, bad parameters)."""


class InvalidGrammar(RequestError):
    """A schema llguidance cannot compile (unknown type or format, dangling $ref, bad pattern...)."""
