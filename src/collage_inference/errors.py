"""The one exception hierarchy of collage-inference.

    CollageError                    base: catch this to catch everything we raise on purpose
    ├── ConfigError                 a setting or flag is invalid (bad grid, unknown model kind)
    │   └── ListenError             a server cannot listen on its address (port taken)
    ├── DataError                   a dataset cannot be read
    │   ├── DataNotFoundError       a file or folder is missing
    │   └── DataFormatError         a file is truncated, corrupt or laid out wrongly
    ├── GeometryError               tiles and grid do not fit together
    ├── ModelError                  a checkpoint or exported model cannot be built or loaded
    │   └── ExportError             ONNX export failed or does not match PyTorch
    └── ServingError                serving failed; ``status`` is the HTTP code it maps to
        ├── ProtocolError           400: malformed request (JSON, dtype, shape, image)
        │   ├── PayloadTooLargeError  413: body or image beyond the limits
        │   │   └── HeadersTooLargeError  431: the request head beyond 64 KiB
        │   └── RequestTimeoutError   408: the client sent its body too slowly
        ├── UnauthorizedError       401: missing or wrong bearer token
        ├── NotFoundError           404: no such path
        │   └── ModelNotFoundError  404: unknown model name
        ├── MethodNotAllowedError   405: the path exists, the method does not
        ├── OverloadedError         429: queues full, retry later
        ├── WorkerError             502: a worker call failed
        │   └── WorkerDownError     502: the worker cannot take calls (marked down until probed back)
        ├── UnavailableError        503: no worker ready
        └── DeadlineExceededError   504: the end-to-end deadline passed

Every message says what was wrong and, where there is one, how to fix it. Lower-level
exceptions are converted at the boundary with ``raise ... from exc`` so the cause is kept.
"""


class CollageError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(CollageError):
    """A setting, flag or config file value is invalid."""


class ListenError(ConfigError):
    """A server cannot listen on its address (the port is taken, or the host is not ours)."""

    exit_code = 3  # a server process's exit status for this error, so launchers can move it


class DataError(CollageError):
    """A dataset cannot be read."""


class DataNotFoundError(DataError):
    """A dataset file or folder does not exist."""


class DataFormatError(DataError):
    """A dataset file exists but is truncated, corrupt or has the wrong layout."""


class GeometryError(CollageError):
    """Tiles, cells and grid size are inconsistent."""


class ModelError(CollageError):
    """A model, checkpoint or exported model cannot be built or loaded."""


class ExportError(ModelError):
    """ONNX export failed or its outputs differ from PyTorch."""


class ServingError(CollageError):
    """Serving failed; subclasses map to HTTP status codes in one place (the HTTP layer)."""

    status: int = 500


class ProtocolError(ServingError):
    """A request is malformed: bad JSON, wrong dtype or shape, undecodable image (HTTP 400)."""

    status = 400


class PayloadTooLargeError(ProtocolError):
    """A request body or image exceeds the configured limits (HTTP 413)."""

    status = 413


class HeadersTooLargeError(PayloadTooLargeError):
    """A request's line and headers together exceed what a server reads of them (HTTP 431)."""

    status = 431


class UnauthorizedError(ServingError):
    """The request lacks the shared bearer token, or carries a wrong one (HTTP 401)."""

    status = 401


class RequestTimeoutError(ProtocolError):
    """The client took longer than the limit to send its request body (HTTP 408)."""

    status = 408


class NotFoundError(ServingError):
    """No endpoint has the requested path (HTTP 404)."""

    status = 404


class MethodNotAllowedError(ServingError):
    """The path exists but not for the request's method (HTTP 405)."""

    status = 405


class ModelNotFoundError(NotFoundError):
    """The request names a model this server does not serve (HTTP 404)."""

    status = 404


class OverloadedError(ServingError):
    """Queues are full; the client should retry later (HTTP 429)."""

    status = 429


class WorkerError(ServingError):
    """A worker failed, hung, or answered garbage (HTTP 502 when nothing else can answer)."""

    status = 502


class WorkerDownError(WorkerError):
    """A worker cannot take calls (refused, timed out, answered garbage or a 5xx): the pool
    marks it down until its readiness probe answers again."""


class UnavailableError(ServingError):
    """No worker is ready to take the request (HTTP 503)."""

    status = 503


class DeadlineExceededError(ServingError):
    """The request missed its end-to-end deadline (HTTP 504)."""

    status = 504
