"""Count the tokens a Hugging Face VLM's decoder layers receive at the prefill of each
``generate`` call, and make a failing ``generate`` fail the run.

The counts are measured, not derived from the budget: a forward pre-hook on every decoder layer
reads the sequence length of the hidden states entering it at the first (prefill) forward of a
call. They hold for the patched and for the unmodified model alike, so ``apet=false`` records
the stock counts with the same code. Needs torch (not lmms-eval).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from torch import nn

from .errors import ApetEvalError


@dataclass(frozen=True)
class GenerationRecord:
    """What one ``generate`` call (batch size 1) fed the LLM and produced.

    Attributes:
        input_tokens: tokens entering decoder layer 0 at prefill (text + visual after stage 1).
        layer_tokens: tokens entering the last decoder layer at prefill (after stage 2, when on).
        layer: the first decoder layer that received fewer tokens than layer 0 (the stage-2
            layer), or None when every layer received the same count.
        uncompressed_tokens: the prompt's length as the processor built it (``input_ids``, every
            visual placeholder expanded): what the unmodified model receives.
        output_tokens: tokens ``generate`` appended to the prompt.
        seconds: wall time of the call.
    """

    input_tokens: int
    layer_tokens: int
    layer: int | None
    uncompressed_tokens: int
    output_tokens: int
    seconds: float


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a ``*ForConditionalGeneration`` VLM, through ``get_decoder()``
    (public ``PreTrainedModel`` API; for LLaVA, LLaVA-NeXT, Video-LLaVA and Qwen2.5-VL in
    transformers 5.17-5.23 it returns the language model, whose ``layers`` are the stack)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ApetEvalError(
            f"cannot find the decoder layers of {type(model).__name__} "
            "(model.get_decoder().layers); token counts need them"
        )
    return layers


class PrefillRecorder:
    """Wraps ``model.generate`` (an instance attribute, so the class is untouched) and records
    one :class:`GenerationRecord` per call in :attr:`records`.

    Install it after :func:`apply_apet`: its hooks then run after the shim's stage-2 hooks on the
    same layers and see the compressed hidden states. A call that raises becomes an
    :class:`ApetEvalError` (a ``BaseException``), which lmms-eval's stock wrappers cannot turn
    into an empty answer.

    Args:
        model: the VLM (``*ForConditionalGeneration``).
        name: the lmms-eval model name, for error messages.
    """

    def __init__(self, model: nn.Module, name: str) -> None:
        self.name = name
        self.records: list[GenerationRecord] = []
        self._lens: list[int | None] = []
        layers = decoder_layers(model)
        self._lens = [None] * len(layers)
        self._handles = [
            layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)
            for i, layer in enumerate(layers)
        ]
        orig = model.generate
        model.generate = functools.wraps(orig)(functools.partial(self._generate, orig))

    def _hook(self, index: int):
        def hook(module, args, kwargs):
            if self._lens[index] is None:  # the first forward of the call: the prefill
                hidden = args[0] if args else kwargs["hidden_states"]
                self._lens[index] = int(hidden.shape[-2])

        return hook

    def _generate(self, orig, *args, **kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[0] != 1:
            shape = None if input_ids is None else tuple(input_ids.shape)
            raise ApetEvalError(
                f"{self.name}: token counts are per sample, so generate must get one prompt "
                f"(input_ids of shape (1, L)), got input_ids of shape {shape}"
            )
        self._lens = [None] * len(self._lens)
        start = time.perf_counter()
        try:
            out = orig(*args, **kwargs)
        except Exception as exc:
            raise ApetEvalError(f"{self.name}: generate failed: {exc!r}") from exc
        seconds = time.perf_counter() - start
        sequences = getattr(out, "sequences", out)
        lens = self._lens
        if lens[0] is None:
            raise ApetEvalError(f"{self.name}: generate returned without a prefill forward")
        layer = next((i for i, n in enumerate(lens) if n != lens[0]), None)
        self.records.append(
            GenerationRecord(
                input_tokens=lens[0],
                layer_tokens=lens[-1],
                layer=layer,
                uncompressed_tokens=int(input_ids.shape[-1]),
                output_tokens=int(sequences.shape[-1] - input_ids.shape[-1]),
                seconds=seconds,
            )
        )
        return out

    def remove(self, model: nn.Module) -> None:
        """Take the hooks and the ``generate`` wrapper off again."""
        for handle in self._handles:
            handle.remove()
        model.__dict__.pop("generate", None)
