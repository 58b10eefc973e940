"""lmms-eval models that run ApET: ``apet_llava`` (alias ``apet_llava_next``),
``apet_qwen2_5_vl`` and ``apet_video_llava``, for measuring accuracy retention with one command::

    python -m lmms_eval eval --model apet_llava \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,preset=llava-1.5/64 \\
        --tasks pope --batch_size 1 --output_path out/ --log_samples

Each wrapper is lmms-eval's stock wrapper for the family (``llava_hf``, ``qwen2_5_vl``,
``video_llava``) with the model patched by :func:`apet_kernels.integrations.apply_apet`; the ApET
keys of ``--model_args`` are parsed by :mod:`.args` (``apet=false`` runs the unmodified model
through the same wrapper: the baseline), every other key goes to the stock wrapper. Each sample's
``token_counts`` in the logged results record the tokens the LLM received at prefill
(``input_tokens``), before its last layer (``layer_tokens``, i.e. after the stage-2 layer), and
the uncompressed prompt length; lmms-eval's ``efficiency`` section sums them.

Registration: the entry point ``apet = apet_kernels.integrations.lmms_eval:manifests`` in the
group ``lmms_eval.models`` (lmms-eval 0.7.x's ``ModelRegistryV2.load_entrypoint_manifests``
calls :func:`manifests`). Importing this package imports neither lmms-eval, torch nor
transformers; the wrapper classes load when lmms-eval resolves a model name.
"""

from __future__ import annotations

from .args import APET_KEYS, ApetArgs, split_model_args
from .errors import ApetEvalError

#: lmms-eval model id -> wrapper class path
MODELS = {
    "apet_llava": "apet_kernels.integrations.lmms_eval.llava.ApetLlava",
    "apet_qwen2_5_vl": "apet_kernels.integrations.lmms_eval.qwen2_5_vl.ApetQwen2_5_VL",
    "apet_video_llava": "apet_kernels.integrations.lmms_eval.video_llava.ApetVideoLlava",
}
ALIASES = {"apet_llava": ("apet_llava_next",)}

#: versions the harness is tested with (the ``lmms-eval`` extra pins the same)
TESTED_LMMS_EVAL = "0.7.3"

__all__ = [
    "ALIASES",
    "APET_KEYS",
    "MODELS",
    "TESTED_LMMS_EVAL",
    "ApetArgs",
    "ApetEvalError",
    "manifests",
    "split_model_args",
]


def manifests() -> list:
    """The ``lmms_eval.models`` entry point: one ``ModelManifest`` per model (simple wrappers)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(model_id=name, simple_class_path=path, aliases=ALIASES.get(name, ()))
        for name, path in MODELS.items()
    ]
