"""The shims under conditions review found fragile (CPU, tiny models, no downloads): concurrent
forwards on one patched model, gradient checkpointing, the KV cache's keyword on every tested
transformers release, the map from output rows to prompt columns, and host syncs in stage 2."""

from __future__ import annotations

import threading

import pytest
import reference
import torch
from test_transformers_shims import GEN, MODELS, built
from tiny_vlms import BUDGETS, PROMPTS, patching

from apet_kernels.integrations import apply_apet, last_selection, remove_apet
from apet_kernels.integrations.transformers import _compat, _decode, _squeeze, _stage2
from apet_kernels.integrations.transformers._layout import next_positions


@pytest.fixture
def patched():
    yield from patching()


def _generate(model, inputs):
    kw = dict(GEN, output_logits=True, return_dict_in_generate=True)
    out = model.generate(**inputs, **kw)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
def test_two_threads_equal_one_after_the_other(name, patched):
    """Two threads generate on one patched model, both inside their prefill at once (a barrier
    in the stage-2 layer holds the first until the second arrives, so per-model state shared by
    the calls would mix them up): each equals its prompt run alone, and each thread's
    last_selection is its own."""
    model, make = built(name)
    patched(model, **BUDGETS[name])
    prompts = [make(PROMPTS[name][:1]), make(PROMPTS[name][1:])]
    alone = [_generate(model, p) for p in prompts]
    alone_units = [len(_units(model, p)) for p in prompts]
    assert alone_units[0] != alone_units[1]  # the prompts differ in their units
    barrier, first = threading.Barrier(2, timeout=60), threading.local()

    def meet(module, args, kwargs):
        if not getattr(first, "done", False):  # prefill only: decode steps may differ in count
            first.done = True
            barrier.wait()

    layer = model.model.language_model.layers[BUDGETS[name]["layer"]]
    hook = layer.register_forward_pre_hook(meet, with_kwargs=True)
    results, units, errors = [None, None], [None, None], []

    def run(i):
        try:
            results[i] = _generate(model, prompts[i])
            units[i] = len(last_selection(model).units)
        except BaseException as err:  # reported below, not lost in the thread
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        hook.remove()
    assert not errors, errors
    for (seq, lg), (seq_alone, lg_alone) in zip(results, alone, strict=True):
        assert torch.equal(seq, seq_alone)
        torch.testing.assert_close(lg, lg_alone, rtol=1e-5, atol=1e-5)
    assert units == alone_units
    # negative control: the two prompts' results differ, so a mix-up would show
    assert results[0][1].shape != results[1][1].shape or not torch.allclose(
        results[0][1], results[1][1]
    )


def _units(model, inputs):
    with torch.no_grad():
        model(**inputs)
    return last_selection(model).units


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
def test_gradient_checkpointing_equals_plain_backward(name, use_reentrant, patched):
    """With gradient checkpointing (which replays layers in the backward; before 5.24 with the
    layers' pre-hooks, from 5.24 without), the loss and every decoder gradient equal a plain
    backward, and stage 2 still compresses (the replay gets the call's context again)."""
    model, make = built(name)
    patched(model, **BUDGETS[name])
    inputs = make(PROMPTS[name], pad="left")
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] >= 250, -100)
    labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    params = [p for p in model.model.language_model.parameters() if p.requires_grad]

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(**inputs, labels=labels, use_cache=False).loss
        loss.backward()  # not autograd.grad: the reentrant checkpoint refuses it
        return loss.detach(), [None if p.grad is None else p.grad.clone() for p in params]

    # activation_* from 5.24 on (gradient_* remains a deprecated alias there)
    enable = getattr(model, "activation_checkpointing_enable", None)
    enable = enable or model.gradient_checkpointing_enable
    disable = getattr(model, "activation_checkpointing_disable", None)
    disable = disable or model.gradient_checkpointing_disable
    model.train()
    try:
        ref_loss, ref_grads = loss_and_grads()
        enable({"use_reentrant": use_reentrant})
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
        loss, grads = loss_and_grads()
    finally:
        disable()
        model.zero_grad(set_to_none=True)
        model.eval()
    torch.testing.assert_close(loss, ref_loss)
    assert sum(g is not None for g in grads) == sum(g is not None for g in ref_grads) > 0
    for g, ref in zip(grads, ref_grads, strict=True):
        if ref is not None:
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
    # negative control: a different budget changes the loss
    apply_apet(model, **dict(BUDGETS[name], layer_keep=1.0))
    with torch.no_grad():
        assert not torch.allclose(model(**inputs, labels=labels).loss, ref_loss)


@pytest.mark.parametrize(
    "batch, positions", [("padded", None), ("single", "original"), ("single", "compact")]
)
@pytest.mark.parametrize("name", MODELS)
def test_cached_decode_logits_equal_uncached_at_every_step(name, batch, positions, patched):
    """Every decode step's logits (not only the tokens: a wrong position moves logits by a few
    1e-3 without changing greedy tokens) equal generate without a cache: a left-padded batch
    with a text-only row, and one unpadded prompt (generate then drops the all-ones mask, the
    case that decoded with uncompressed positions on 5.24 when the cache came as ``cache=``)."""
    model, make = built(name)
    patched(model, **dict(BUDGETS[name], positions=positions))
    if batch == "padded":
        inputs = make([*PROMPTS[name], [6]], pad="left")
    else:
        inputs = make(PROMPTS[name][1:])
        assert bool(inputs.get("attention_mask", torch.ones(1)).all())  # no padding
    kw = dict(GEN, output_logits=True, return_dict_in_generate=True)
    cached = model.generate(**inputs, **kw)
    uncached = model.generate(**inputs, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert len(cached.logits) == GEN["max_new_tokens"]
    for step, (a, b) in enumerate(zip(cached.logits, uncached.logits, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    # negative control: decode positions one off (prefill untouched) leave the first step's
    # logits equal and move every later step's, so the per-step comparison sees them
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_decode, "next_positions", lambda *a: next_positions(*a) + 1)
        shifted = model.generate(**inputs, **kw)
    torch.testing.assert_close(shifted.logits[0], cached.logits[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(shifted.logits[1:], cached.logits[1:], strict=True):
        assert not torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    # negative control: unpatched decoding of the same prompt differs at the first step
    remove_apet(model)
    plain = model.generate(**inputs, **kw)
    assert not torch.allclose(plain.logits[0], cached.logits[0], rtol=1e-3, atol=1e-3)


def test_cache_keyword_either_name(patched):
    """The cache can be passed as ``cache`` or ``past_key_values`` (the name the installed
    release takes and, from 5.24 on, its deprecated alias), never as both."""
    model, make = built("llava")
    patched(model, **BUDGETS["llava"])
    inputs = make(PROMPTS["llava"][:1])
    step = torch.tensor([[5]])
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(step)], 1)
    outs = []
    with torch.no_grad():
        for name in _compat.CACHE_NAMES:
            first = model(**inputs)
            cache = _compat.output_cache(first)
            outs.append(model(input_ids=step, attention_mask=mask, **{name: cache}).logits)
        with pytest.raises(ValueError, match="both"):
            model(input_ids=step, cache=cache, past_key_values=cache)
        longer = dict(inputs, input_ids=torch.cat([inputs["input_ids"], step], 1))
        ref = model(**dict(longer, attention_mask=mask)).logits[:, -1:]
    for out in outs:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["llava", "llava_next", "qwen2_5_vl"])
def test_output_columns_map_rows_to_prompt_columns(name, patched):
    """last_selection's output_columns give the prompt column of every logits row (checked
    against the hand-built reference's columns), and hidden_states follow stage1_columns up to
    the stage-2 layer and output_columns after it."""
    model, make = built(name)
    cfg = dict(BUDGETS[name], positions="compact")
    patched(model, **cfg)
    prompts = PROMPTS[name]
    refs = [
        reference.logits(model, reference.stage1(name, model, make([p]), cfg["vision_keep"]), cfg)
        for p in prompts
    ]
    for pad in ("left", "right"):
        batch = make([*prompts, [6]], pad=pad)
        with torch.no_grad():
            out = model(**batch, output_hidden_states=True)
        sel = last_selection(model)
        cols = sel.output_columns
        assert cols.shape == out.logits.shape[:2]
        width = batch["input_ids"].shape[1]
        for b, (ref, ref_col) in enumerate(refs):
            offset = width - int(batch["attention_mask"][b].sum()) if pad == "left" else 0
            row = cols[b][cols[b] >= 0]
            assert torch.equal(row, ref_col + offset)
            torch.testing.assert_close(out.logits[b][cols[b] >= 0], ref, rtol=1e-5, atol=1e-5)
        text = cols[len(prompts)][cols[len(prompts)] >= 0]  # the text-only row keeps every column
        assert torch.equal(text, batch["attention_mask"][-1].nonzero()[:, 0])
        layer = cfg["layer"]
        hs = out.hidden_states
        assert [h.shape[1] for h in hs[: layer + 1]] == [sel.stage1_columns.shape[1]] * (layer + 1)
        assert [h.shape[1] for h in hs[layer + 1 :]] == [cols.shape[1]] * (len(hs) - layer - 1)
        assert (
            cols.shape[1] < sel.stage1_columns.shape[1] < width
        )  # negative control: shapes differ


_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique_dim", "_unique2"}
_HOST_READS = ("tolist", "item", "__bool__", "__int__")


class _SyncRecorder:
    """Records, while ``inside``, every aten op (a dispatch mode) and every host read of a
    tensor (``tolist``, ``item``, ``bool``, ``int``: those never reach aten on CPU)."""

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.inside, self.seen = False, []
        rec = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if rec.inside:
                    rec.seen.append(func.__name__.split(".")[0])
                return func(*args, **(kwargs or {}))

        self.mode = Mode
        for name in _HOST_READS:
            orig = getattr(torch.Tensor, name)

            def spy(tensor, *a, _orig=orig, _name=name, **k):
                if rec.inside:
                    rec.seen.append(_name)
                return _orig(tensor, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, spy)

    def wrap(self, fn, inside: bool):
        """``fn`` run with recording switched on (or off, for the op's own code)."""

        def run(*args, **kwargs):
            was, self.inside = self.inside, inside
            try:
                if inside:
                    with self.mode():
                        return fn(*args, **kwargs)
                return fn(*args, **kwargs)
            finally:
                self.inside = was

        return run

    def syncs(self) -> set[str]:
        return (_SYNC_OPS | set(_HOST_READS)) & set(self.seen)


def test_stage2_makes_no_host_sync(monkeypatch, patched):
    """Stage 2 (the shim's code around the op) reads nothing back to the host: its widths follow
    from stage 1's host counts. The op itself is left out (it has its own sync-free guarantee and
    tests)."""
    rec = _SyncRecorder(monkeypatch)
    # negative control: the recorder sees a sync
    rec.wrap(lambda: torch.tensor([0, 1]).nonzero().tolist(), True)()
    assert rec.syncs() == {"nonzero", "tolist"}
    rec.seen.clear()
    monkeypatch.setattr(_stage2, "stage2", rec.wrap(_stage2.stage2, True))
    monkeypatch.setattr(_squeeze, "compress_varlen", rec.wrap(_squeeze.compress_varlen, False))
    model, make = built("llava")
    patched(model, **BUDGETS["llava"])
    for pad in ("left", "right"):
        with torch.no_grad():
            model(**make([*PROMPTS["llava"], [6]], pad=pad))
    assert len(rec.seen) > 20  # it ran, and the recorder saw its ops
    assert not rec.syncs(), sorted(rec.syncs())


def test_stage2_builds_on_the_hidden_states_device(monkeypatch, patched):
    """Stage 2 builds its tensors on the device of the hidden states entering the layer (with
    device_map that layer may sit on another GPU than input_ids). Without a second device, the
    hidden states are sent to "meta" (the op has meta kernels): every stage-2 tensor must follow
    them, while stage 1's stay on the CPU; mixing the two raises."""
    import copy
    import dataclasses

    results = []
    orig = _stage2.stage2

    def stage2(patch, ctx, hidden):
        twin = dataclasses.replace(ctx, state=copy.copy(ctx.state), raw=copy.copy(ctx.raw))
        results.append((orig(patch, twin, hidden.to("meta")), twin, ctx.tok_row.device))
        return orig(patch, ctx, hidden)

    monkeypatch.setattr(_stage2, "stage2", stage2)
    model, make = built("llava")
    patched(model, **BUDGETS["llava"])
    with torch.no_grad():
        model(**make(PROMPTS["llava"], pad="left"))
    ((hidden2, valid2, pos2), twin, stage1_device) = results[0]
    assert stage1_device.type == "cpu"
    assert {t.device.type for t in (hidden2, valid2, pos2, twin.state.group2.valid)} == {"meta"}
    assert twin.state.group2.next_pos.device.type == "meta"
    # negative control: combining the CPU stage-1 mask with a meta one fails
    with pytest.raises(RuntimeError):
        results[0][1].visual1 & valid2[:, :1].expand_as(results[0][1].visual1)
