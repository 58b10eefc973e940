"""What the three ApET wrappers add to lmms-eval's stock wrappers (imports lmms-eval).

A wrapper is ``class ApetX(ApetWrapper, StockX)``: :class:`ApetWrapper` takes the ApET keys out
of the keyword arguments, checks them and the checkpoint's model type before any weights load,
lets the stock ``__init__`` load the model, patches it with :func:`apply_apet` (unless
``apet=false``) and installs a :class:`PrefillRecorder`. ``generate_until`` runs the stock code
one request at a time, so that each answer gets the counts of its own ``generate`` call, and
returns them as lmms-eval ``GenerationResult`` token counts.

lmms-eval API relied on (0.7.3): ``lmms_eval.api.instance.GenerationResult`` / ``TokenCounts``
(per-sample counts, summed into the results' ``efficiency`` section) and
``lmms_eval.models.model_utils.gen_metrics.log_metrics`` (the results' ``throughput`` section,
which averages the extra ``apet_*`` figures over samples). Both are what the stock models use.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger

from ..transformers import apply_apet, presets
from .args import ApetArgs, split_model_args
from .errors import ApetEvalError
from .recording import GenerationRecord, PrefillRecorder


@dataclass
class ApetTokenCounts(TokenCounts):
    """lmms-eval's per-request counts (``input_tokens``: tokens the LLM received at prefill;
    ``output_tokens``: generated) plus ApET's: ``layer_tokens`` (tokens entering the last decoder
    layer), ``apet_layer`` (where the count dropped, absent when it never did) and
    ``uncompressed_tokens`` (the prompt as the processor built it)."""

    layer_tokens: int | None = None
    uncompressed_tokens: int | None = None
    apet_layer: int | None = None

    def to_dict(self) -> dict:
        out = super().to_dict()
        for key in ("layer_tokens", "uncompressed_tokens", "apet_layer"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


def single_process_device_map(kwargs: dict, default_device) -> dict:
    """``kwargs`` with ``device_map`` set to the device when it is not given and the run is a
    single process (``WORLD_SIZE`` unset or 1). The stock defaults (``""`` for llava_hf, rejected
    by transformers 5; ``"auto"`` for qwen2_5_vl, whose inputs then go to "cuda") do not load
    onto ``--device cpu``; under accelerate the stock code picks ``cuda:<local rank>`` itself."""
    if kwargs.get("device_map") or int(os.environ.get("WORLD_SIZE", "1")) != 1:
        return kwargs
    return {**kwargs, "device_map": str(kwargs.get("device") or default_device)}


def _counts(record: GenerationRecord) -> ApetTokenCounts:
    return ApetTokenCounts(
        input_tokens=record.input_tokens,
        output_tokens=record.output_tokens,
        layer_tokens=record.layer_tokens,
        uncompressed_tokens=record.uncompressed_tokens,
        apet_layer=record.layer,
    )


class ApetWrapper:
    """Mixin put before a stock lmms-eval wrapper class.

    Class attributes the subclass sets:
        model_name: the lmms-eval model id (for messages).
        model_types: the ``config.model_type`` values the wrapper accepts.
    """

    model_name: str = ""
    model_types: tuple[str, ...] = ()

    def __init__(self, **kwargs) -> None:
        try:
            apet, rest = split_model_args(kwargs)
            pretrained = rest.get("pretrained", self._stock_default("pretrained"))
            model_type = self._checkpoint_type(pretrained)
            self._check_preset(apet, model_type)
            batch_size = rest.get("batch_size", 1)
            if str(batch_size) != "1":
                raise ValueError(
                    f"batch_size must be 1 (token counts are per sample), got {batch_size!r}"
                )
        except (ValueError, TypeError) as exc:
            raise ApetEvalError(f"{self.model_name}: {exc}") from exc
        try:
            self._load_stock(**rest)
        except Exception as exc:
            raise ApetEvalError(
                f"{self.model_name}: the stock wrapper failed to load {pretrained!r}: {exc!r}"
            ) from exc
        model = self.model
        if apet.enabled:
            try:
                apply_apet(model, apet.preset, **apet.overrides)
            except (ValueError, TypeError, NotImplementedError) as exc:
                raise ApetEvalError(f"{self.model_name}: {exc}") from exc
        self.apet_args: ApetArgs = apet
        self.apet_recorder = PrefillRecorder(model, self.model_name)
        logger.info(f"{self.model_name}: {pretrained} ({model_type}), {apet.describe()}")

    def _load_stock(self, **kwargs) -> None:
        """The stock ``__init__`` (a subclass may replace the loading)."""
        super().__init__(**kwargs)

    @classmethod
    def _stock_default(cls, name: str):
        for base in cls.__mro__:
            if base is ApetWrapper or ApetWrapper in base.__mro__:
                continue
            param = inspect.signature(base.__init__).parameters.get(name)
            if param is not None and param.default is not inspect.Parameter.empty:
                return param.default
        raise ValueError(f"{name} is required")

    def _checkpoint_type(self, pretrained) -> str:
        """``config.model_type`` of the checkpoint, read before any weights load."""
        from transformers import AutoConfig

        if not isinstance(pretrained, str) or not pretrained:
            raise ValueError(f"pretrained must be a checkpoint name or path, got {pretrained!r}")
        try:
            model_type = AutoConfig.from_pretrained(pretrained).model_type
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the config of pretrained={pretrained!r}: {exc}") from exc
        if model_type not in self.model_types:
            raise ValueError(
                f"pretrained={pretrained!r} is a {model_type!r} checkpoint; {self.model_name} "
                f"takes {', '.join(self.model_types)}"
            )
        return model_type

    @staticmethod
    def _check_preset(apet: ApetArgs, model_type: str) -> None:
        if apet.enabled and apet.preset is not None:
            names = presets(model_type)
            if apet.preset not in names:
                raise ValueError(
                    f"unknown preset {apet.preset!r} for {model_type}; presets: {', '.join(names)}"
                )

    def generate_until(self, requests) -> list:
        """The stock ``generate_until``, one request at a time, each answer with its counts."""
        results = []
        recorder = self.apet_recorder
        for request in requests:
            recorder.records.clear()
            try:
                answers = super().generate_until([request])
            except Exception as exc:
                raise ApetEvalError(
                    f"{self.model_name}: request {request.doc_id} of {request.task_name} "
                    f"failed: {exc!r}"
                ) from exc
            if len(answers) != 1 or len(recorder.records) != 1:
                raise ApetEvalError(
                    f"{self.model_name}: request {request.doc_id} of {request.task_name} gave "
                    f"{len(answers)} answers from {len(recorder.records)} generate calls (want "
                    "1 and 1); the stock wrapper answered without generating (e.g. a visual it "
                    "could not load)"
                )
            record = recorder.records[0]
            results.append(GenerationResult(text=answers[0], token_counts=_counts(record)))
            log_metrics(
                total_elapsed_time=record.seconds,
                total_gen_tokens=record.output_tokens,
                avg_speed=record.output_tokens / record.seconds if record.seconds > 0 else 0.0,
                additional_metrics={
                    "apet_input_tokens": record.input_tokens,
                    "apet_layer_tokens": record.layer_tokens,
                    "apet_uncompressed_tokens": record.uncompressed_tokens,
                },
            )
        return results

    def loglikelihood(self, requests) -> list:
        raise ApetEvalError(
            f"{self.model_name}: loglikelihood requests are refused (task "
            f"{requests[0].task_name if requests else '?'}): lmms-eval's stock code scores the "
            "continuation against the uncompressed input_ids, which do not line up with the "
            "logits of a compressed sequence; use a generate_until task (apet=false refuses "
            "them too, so a baseline is never run on tasks the compressed model cannot run)"
        )

    def generate_until_multi_round(self, requests) -> list:
        raise ApetEvalError(
            f"{self.model_name}: multi-round generation is not supported (token counts are "
            "recorded per single generate call)"
        )
