"""``apet_video_llava``: lmms-eval's ``video_llava`` wrapper with ApET (Video-LLaVA checkpoints in
the Hugging Face format, ``LanguageBind/Video-LLaVA-7B-hf``).

The stock ``__init__`` (lmms-eval 0.7.3) puts the model on ``cuda:<rank>`` whatever ``device``
says, loads it in float32 whatever ``dtype`` says, and never sets the tokenizer its
``tokenizer`` property returns; this wrapper loads the model and processor itself, honouring
``device`` and ``dtype``, and keeps the stock ``generate_until`` (8 frames per video, the stock
prompt). The stock processor needs torchvision (its video processor), which the CPU test
environment lacks: on CPU the loader and ``generate_until`` are tested with the processor and the
video reader mocked (see the tests).
"""

from __future__ import annotations

import functools

import torch
from accelerate import Accelerator
from lmms_eval.api.model import lmms
from lmms_eval.models.simple.video_llava import VideoLLaVA
from transformers import VideoLlavaForConditionalGeneration, VideoLlavaProcessor

from .base import ApetWrapper

#: the stock wrapper's prompt and frame count (its generate_until formats and asserts them)
PROMPT = "USER: <video>{}? ASSISTANT:"
NUM_FRAMES = 8


class ApetVideoLlava(ApetWrapper, VideoLLaVA):
    """``video_llava`` with a loader that honours ``device`` and ``dtype``, patched by
    ``apply_apet`` (default preset ``video-llava/32``: 32 tokens per frame)."""

    model_name = "apet_video_llava"
    model_types = ("video_llava",)

    def _load_stock(
        self,
        pretrained: str = "LanguageBind/Video-LLaVA-7B-hf",
        device: str = "cuda:0",
        dtype: str | torch.dtype = "auto",
        batch_size: int | str = 1,
        revision: str | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str = "sdpa",
        num_frames: int = NUM_FRAMES,
        use_cache: bool = True,
        truncation: bool = True,
        conv_template: str = "llava_v1",
        truncate_context: bool = False,
        device_map: str | None = None,
    ) -> None:
        if num_frames != NUM_FRAMES:
            raise ValueError(
                f"num_frames must be {NUM_FRAMES} (the stock wrapper's), got {num_frames}"
            )
        if device_map not in (None, "", "auto") and str(device_map) != str(device):
            raise ValueError(
                f"device_map={device_map!r}: the model goes to device={device!r} whole; "
                "give device only"
            )
        lmms.__init__(self)
        accelerator = Accelerator()
        if accelerator.num_processes > 1:
            device = f"cuda:{accelerator.local_process_index}"
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        self._device = torch.device(device)
        model = VideoLlavaForConditionalGeneration.from_pretrained(
            pretrained,
            revision=revision,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
        model = model.to(self._device).eval()
        # The stock generate_until moves the processor's float32 pixels to the device only.
        model.generate = functools.wraps(model.generate)(
            functools.partial(_generate_in_dtype, model.generate, model.dtype)
        )
        self._model = model
        self._processor = VideoLlavaProcessor.from_pretrained(pretrained, revision=revision)
        self._tokenizer = self._processor.tokenizer
        self._config = model.config
        self.pretrained = pretrained
        self.prompt = PROMPT
        self.num_frames = num_frames
        self.batch_size_per_gpu = int(batch_size)
        self.use_cache = use_cache
        self.truncation = truncation
        self.conv_template = conv_template
        self.truncate_context = truncate_context
        if accelerator.num_processes > 1:  # data parallel, as the stock wrapper does it
            self._model = accelerator.prepare_model(model, evaluation_mode=True)
            self.accelerator = accelerator
            self._rank = accelerator.local_process_index
            self._world_size = accelerator.num_processes
        else:
            self._rank = 0
            self._world_size = 1


def _generate_in_dtype(generate, dtype: torch.dtype, *args, **kwargs):
    """``generate`` with floating-point tensor arguments (pixels) cast to the model's dtype."""
    kwargs = {
        k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in kwargs.items()
    }
    return generate(*args, **kwargs)
