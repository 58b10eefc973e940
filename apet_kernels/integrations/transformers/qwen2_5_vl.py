"""placeholder"""

from ._common import Shim


class Qwen25VLShim(Shim):
    model_types = ()  # not implemented yet
