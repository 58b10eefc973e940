"""``_runner``: the pruning flags set after a runner's ``load_model`` (no engine started)."""

from __future__ import annotations

import types

import pytest

from apet_kernels.integrations.vllm import _runner, register


def _runner_class():
    class Runner:
        def __init__(self, model, evs: bool):
            self._model = model
            mm = types.SimpleNamespace(is_multimodal_pruning_enabled=lambda: evs)
            self.model_config = types.SimpleNamespace(multimodal_config=mm)
            self.is_multimodal_pruning_enabled = False
            self.requires_sequential_video_encoding = False

        def load_model(self, load_dummy_weights: bool = False):
            self.loaded = True
            return "loaded"

        def get_model(self):
            return self._model

    return Runner


class Plain:
    pass


class Pruning:
    supports_multimodal_pruning = True


@pytest.mark.parametrize(
    ("model", "evs", "want"),
    [
        (Plain(), True, False),  # a model without pruning support never gets the plumbing
        (Pruning(), True, True),  # vLLM's own EVS: as GPUModelRunner computes it
        (Pruning(), False, False),  # neither EVS nor the model asks
        (
            types.SimpleNamespace(
                supports_multimodal_pruning=True, is_multimodal_pruning_enabled=True
            ),
            False,
            True,
        ),
        (
            types.SimpleNamespace(
                supports_multimodal_pruning=True, is_multimodal_pruning_enabled="yes"
            ),
            False,
            False,
        ),
    ],
)
def test_flags_after_load_model(model, evs, want):
    cls = _runner_class()
    assert _runner.patch_runner(cls)
    assert not _runner.patch_runner(cls)  # wrapped once only
    runner = cls(model, evs)
    assert runner.load_model() == "loaded" and runner.loaded
    assert runner.is_multimodal_pruning_enabled is want
    assert runner.requires_sequential_video_encoding is False


def test_sequential_video_flag():
    cls = _runner_class()
    _runner.patch_runner(cls)
    model = Pruning()
    model.requires_sequential_video_encoding = True
    runner = cls(model, False)
    runner.load_model()
    assert runner.requires_sequential_video_encoding is True


def test_register_wraps_the_cpu_runner():
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    register()
    register()  # idempotent
    assert getattr(CPUModelRunner.__dict__["load_model"], _runner._MARK, False)
    assert not _runner.patch_runner(CPUModelRunner)
