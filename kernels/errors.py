"""The error hierarchy every part of trtllm raises (STYLE.md rule 6).

It lives in `kernels/`, the one folder every other folder may import.
"""


class TrtllmError(Exception):
    """Base class of every error trtllm raises on purpose."""


class UnsupportedModelError(TrtllmError):
    """The model cannot be traced or canonicalized: the message says which part and why."""


class LoweringError(TrtllmError):
    """The fused graph cannot be turned into an engine (an op without implementation, ...)."""


class ConfigError(TrtllmError):
    """An invalid build or runtime setting (dtype, sizes, backend, ...)."""


class RequestError(TrtllmError):
    """An invalid request: empty prompt, token outside the vocabulary, too long, ..."""


class OpInputError(TrtllmError, ValueError):
    """An op called with inputs outside its contract (shape, dtype, an option): the message names
    the op and the argument. Also a ValueError, which the ops' checks raised before it existed."""
