"""placeholder"""

from ._common import Shim


class LlavaNextShim(Shim):
    model_types = ()  # not implemented yet
