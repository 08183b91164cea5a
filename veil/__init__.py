"""veil: open LLMs run privately when part of the hardware, or the other party, is not trusted."""

from veil.api import Generation, Model, load
from veil.errors import (CheckpointError, ConfigError, DataError, InputError, IntegrityError,
                         ProtocolAbort, UnsupportedError, VeilError)

__version__ = "0.1.0"
__all__ = ["load", "Model", "Generation", "VeilError", "ConfigError", "UnsupportedError",
           "CheckpointError", "InputError", "DataError", "IntegrityError", "ProtocolAbort"]
