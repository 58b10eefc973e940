"""The one error type the lmms-eval wrappers raise."""

from __future__ import annotations


class ApetEvalError(BaseException):
    """A failed ApET evaluation run: a bad ``--model_args`` value, a refused request type, or a
    generation that raised.

    It derives from ``BaseException`` on purpose, so that nothing on lmms-eval's path can turn
    it into a result: lmms-eval 0.7.3's CLI catches ``Exception`` around the whole evaluation
    and, below ``--verbosity DEBUG``, logs it and exits 0; the stock LLaVA wrapper catches
    ``Exception`` around ``generate`` and records an empty answer. The original exception, when
    there is one, is chained as ``__cause__``. Code that calls lmms-eval from Python and wants
    to handle the failure catches ``ApetEvalError`` by name.
    """
