"""User-facing errors. Each names the offending value and the limit it broke.

The CLI prints these on one line and exits non-zero; the server maps them to 4xx responses.
"""


class EmberError(Exception):
    """Base class for errors caused by the user's input, not by a bug."""


class ConfigError(EmberError, ValueError):
    """An invalid setting or an unsupported model."""


class ModelLoadError(EmberError):
    """The model path is missing, unreadable, truncated or of an unsupported format."""


class InvalidRequestError(EmberError, ValueError):
    """A request the engine cannot serve: bad sampling values, a prompt over the context."""


class QueueFullError(EmberError):
    """The waiting queue is full (`max_queued_requests`)."""
