"""The wrapper classes in-process (needs lmms-eval: runs in .venv-lmms; skipped elsewhere).

What runs for real: lmms-eval's model registry (entry point), the stock ``__init__`` and
``generate_until`` of ``llava_hf`` (a LLaVA-NeXT checkpoint, with its real processor),
``qwen2_5_vl`` and ``video_llava`` (lmms-eval 0.7.3) on tiny checkpoints loaded from disk,
``apply_apet`` and the token recorder. What is mocked, because it needs
torchvision (no CPU build on the registry here) or ``qwen_vl_utils`` (not installed): the
Qwen2.5-VL processor and ``process_vision_info``, the Video-LLaVA processor and the stock video
reader. The mocks return inputs laid out as the real processors lay them out (tiny_vlms), so the
token counts and answers are checked against the model run directly through transformers.
"""

from __future__ import annotations

import pytest

pytest.importorskip("lmms_eval")

import lmms_eval.models.simple.qwen2_5_vl as stock_qwen  # noqa: E402
import lmms_eval.models.simple.video_llava as stock_video  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402
from lmms_tiny_checkpoint import (  # noqa: E402
    VIDEO_FRAMES,
    save_llava15,
    save_llava_next,
    save_qwen2_5_vl,
    save_video_llava,
)
from PIL import Image  # noqa: E402

import apet_kernels.integrations.lmms_eval.video_llava as apet_video  # noqa: E402
from apet_kernels import keep_count  # noqa: E402
from apet_kernels.integrations import apply_apet, is_patched  # noqa: E402
from apet_kernels.integrations.lmms_eval import ApetEvalError  # noqa: E402

QWEN_PROMPT = [3, "image", 4]  # 3 text, a 6x8 patch image (12 tokens + 2 markers), 4 text
QWEN_ARGS = "preset=qwen2.5-vl/30%,layer=2"  # the tiny model has 4 layers, not 14
MAX_NEW = 3


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("wrappers")
    return {
        "llava": save_llava15(root / "llava"),
        "next": save_llava_next(root / "next"),
        "qwen": (root / "qwen", save_qwen2_5_vl(root / "qwen")),
        "video": (root / "video", save_video_llava(root / "video")),
    }


NEXT_ARGS = "vision_keep=5,layer=2,layer_keep=2"  # 5 per crop, 2 from layer 2 (4 layers)


def prefill_lengths(model, inputs) -> tuple[list[int], torch.Tensor]:
    """Greedy ``model.generate(**inputs)`` run directly through transformers: the tokens that
    entered each decoder layer at its prefill (its first forward), and the output ids."""
    layers = model.get_decoder().layers
    lens = []

    def hook(module, args, kwargs):
        if len(lens) < len(layers):
            lens.append(int((args[0] if args else kwargs["hidden_states"]).shape[-2]))

    hooks = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        with torch.inference_mode():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    finally:
        for handle in hooks:
            handle.remove()
    return lens, out


@pytest.mark.parametrize("args", [NEXT_ARGS, "apet=false"])
def test_llava_next_counts_and_answer_equal_transformers(ckpts, args):
    """apet_llava_next on a LLaVA-NeXT checkpoint through the stock llava_hf code and the real
    processor (anyres: a 40x24 image is a base crop and 2 grid crops, unpadded, with newlines)."""
    path = ckpts["next"]
    lm = make("apet_llava_next", f"pretrained={path},dtype=float32,{args}")
    assert is_patched(lm.model) == (args != "apet=false")
    image = Image.new("RGB", (24, 40), (200, 30, 90))
    image.putpixel((3, 5), (0, 255, 0))
    lm.task_dict = {"t": {"test": [{"visual": image}]}}
    (result,) = lm.generate_until([request()])
    counts = result.token_counts.to_dict()
    processor = transformers.AutoProcessor.from_pretrained(path)
    text = processor.tokenizer.apply_chat_template(
        [{"role": "user", "content": "<image>\nwhat is it"}], tokenize=False,
        add_generation_prompt=True,
    )  # fmt: skip
    inputs = processor(images=[image], text=text, return_tensors="pt")
    ref = transformers.LlavaNextForConditionalGeneration.from_pretrained(path).eval()
    if args != "apet=false":
        apply_apet(ref, vision_keep=5, layer=2, layer_keep=2)
    lens, out = prefill_lengths(ref, inputs)
    length = inputs["input_ids"].shape[-1]
    assert counts["uncompressed_tokens"] == length
    assert counts["input_tokens"] == lens[0] and counts["layer_tokens"] == lens[-1]
    assert counts["output_tokens"] == MAX_NEW
    if args == "apet=false":
        assert lens == [length] * len(lens) and "apet_layer" not in counts
    else:  # 3 crops of 16 tokens -> 5 each (newlines kept), then fewer from layer 2
        assert lens[0] < length and lens[2] < lens[1] and counts["apet_layer"] == 2
    decode = processor.tokenizer.batch_decode
    assert result.text == decode(out[:, length:], skip_special_tokens=True)[0]
    if args != "apet=false":  # negative control: the unpatched model answers differently
        plain = transformers.LlavaNextForConditionalGeneration.from_pretrained(path).eval()
        _, out_plain = prefill_lengths(plain, inputs)
        assert result.text != decode(out_plain[:, length:], skip_special_tokens=True)[0]


def test_llava_next_refuses_a_llava_1_5_preset(ckpts):
    with pytest.raises(ApetEvalError, match="unknown preset 'llava-1.5/64' for llava_next"):
        make("apet_llava_next", f"pretrained={ckpts['next']},preset=llava-1.5/64")


class QwenProcessorStub:
    """What the stock qwen2_5_vl wrapper calls on its processor, answering with tiny_vlms'
    inputs for QWEN_PROMPT (the real processor needs torchvision)."""

    def __init__(self, make_inputs, tokenizer):
        self.make_inputs, self.tokenizer = make_inputs, tokenizer

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return ["<prompt>"] * len(messages)

    def __call__(self, text, images=None, videos=None, **kwargs):
        assert len(text) == 1 and len(images) == 1 and videos is None
        return transformers.BatchFeature(self.make_inputs([QWEN_PROMPT]))

    def batch_decode(self, ids, **kwargs):
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)


@pytest.fixture
def qwen_stubs(ckpts, monkeypatch):
    path, make_inputs = ckpts["qwen"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    stub = QwenProcessorStub(make_inputs, tokenizer)
    monkeypatch.setattr(stock_qwen.AutoProcessor, "from_pretrained", lambda *a, **k: stub)
    monkeypatch.setattr(
        stock_qwen, "process_vision_info", lambda msgs: ([Image.new("RGB", (8, 6))], None)
    )
    return path, make_inputs, tokenizer


def make(name: str, args: str):
    return get_model(name).create_from_arg_string(args, {"batch_size": 1, "device": "cpu"})


def request(task: str = "t", kind: str = "generate_until") -> Instance:
    gen = {"max_new_tokens": MAX_NEW, "temperature": 0, "until": ["\n\n\n"]}
    return Instance(
        request_type=kind,
        arguments=("what is it", gen, lambda doc: [doc["visual"]], 0, task, "test"),
        idx=0,
        metadata={"task": task, "doc_id": 0, "repeats": 1},
    )


def hf_answer(model, inputs, tokenizer) -> str:
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW)
    return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[-1] :])[0]


def test_registry_resolves_every_model_and_alias():
    from lmms_eval.models import list_available_models

    names = list_available_models(include_aliases=True)
    assert {"apet_llava", "apet_llava_next", "apet_qwen2_5_vl", "apet_video_llava"} <= set(names)
    assert get_model("apet_llava_next") is get_model("apet_llava")
    assert get_model("apet_video_llava").__name__ == "ApetVideoLlava"


@pytest.mark.parametrize("preset", [QWEN_ARGS, "apet=false"])
def test_qwen_counts_and_answer_equal_transformers(qwen_stubs, preset):
    path, make_inputs, tokenizer = qwen_stubs
    lm = make("apet_qwen2_5_vl", f"pretrained={path},{preset}")
    assert is_patched(lm.model) == (preset != "apet=false")
    assert lm.model.dtype == torch.bfloat16  # the stock loader's choice
    lm.task_dict = {"t": {"test": [{"visual": Image.new("RGB", (8, 6))}]}}
    (result,) = lm.generate_until([request()])
    counts = result.token_counts.to_dict()
    inputs = make_inputs([QWEN_PROMPT])
    length = inputs["input_ids"].shape[-1]
    visual = 12
    assert counts["uncompressed_tokens"] == length
    assert counts["output_tokens"] == MAX_NEW
    ref = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.bfloat16
    ).eval()
    if preset == "apet=false":
        assert counts["input_tokens"] == counts["layer_tokens"] == length
        assert "apet_layer" not in counts
    else:
        k1 = keep_count(visual, 0.3)
        assert counts["input_tokens"] == length - visual + k1
        assert counts["layer_tokens"] == length - visual + keep_count(k1, 1 / 3)
        assert counts["apet_layer"] == 2
        apply_apet(ref, "qwen2.5-vl/30%", layer=2)
    assert result.text == hf_answer(ref, inputs, tokenizer)


def test_qwen_refusals(qwen_stubs):
    path, _, _ = qwen_stubs
    lm = make("apet_qwen2_5_vl", f"pretrained={path},{QWEN_ARGS}")
    with pytest.raises(ApetEvalError, match="loglikelihood requests are refused"):
        lm.loglikelihood([request(kind="loglikelihood")])
    with pytest.raises(ApetEvalError, match="multi-round"):
        lm.generate_until_multi_round([request()])


@pytest.mark.parametrize(
    "args, needle",
    [
        ("preset=llava-1.5/64", "unknown preset 'llava-1.5/64' for qwen2_5_vl"),
        ("preset=qwen2.5-vl/30%", "layer must satisfy 1 <= layer < 4"),  # layer 14, 4 layers
        ("vision_keep=0", "vision_keep must be an int >= 1"),
        ("apet=false,layer=2", "apet=false runs the unmodified model"),
        ("batch_size_typo=2", "the stock wrapper failed to load"),  # stock: unexpected kwargs
    ],
)
def test_qwen_bad_arguments_raise_naming_them(qwen_stubs, args, needle):
    path, _, _ = qwen_stubs
    with pytest.raises(ApetEvalError) as info:
        make("apet_qwen2_5_vl", f"pretrained={path},{args}")
    assert needle in str(info.value)


def test_wrong_family_and_batch_size_fail_before_loading(ckpts, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(stock_qwen.Qwen2_5_VLForConditionalGeneration, "from_pretrained", no_load)
    with pytest.raises(ApetEvalError, match="is a 'llava' checkpoint; apet_qwen2_5_vl takes"):
        make("apet_qwen2_5_vl", f"pretrained={ckpts['llava']}")
    path, _ = ckpts["qwen"]
    with pytest.raises(ApetEvalError, match="batch_size must be 1"):
        get_model("apet_qwen2_5_vl").create_from_arg_string(
            f"pretrained={path}", {"batch_size": 2, "device": "cpu"}
        )


class VideoProcessorStub:
    """What the stock video_llava generate_until calls on its processor (the real one needs
    torchvision): inputs with 8 frames of placeholders and pixels."""

    def __init__(self, make_inputs, tokenizer):
        self.make_inputs, self.tokenizer = make_inputs, tokenizer
        self.calls = []

    def __call__(self, text, videos, return_tensors):
        self.calls.append(text)
        return transformers.BatchFeature(self.make_inputs(5, 6))

    def batch_decode(self, ids, **kwargs):
        return self.tokenizer.batch_decode(ids, **kwargs)


@pytest.fixture
def video_stubs(ckpts, monkeypatch):
    path, make_inputs = ckpts["video"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    stub = VideoProcessorStub(make_inputs, tokenizer)
    stub.tokenizer = tokenizer
    monkeypatch.setattr(apet_video.VideoLlavaProcessor, "from_pretrained", lambda *a, **k: stub)
    monkeypatch.setattr(stock_video, "read_video", lambda path, n: [Image.new("RGB", (48, 48))])
    return path, make_inputs, tokenizer, stub


@pytest.mark.parametrize("args", ["dtype=bfloat16", "apet=false,dtype=float32"])
def test_video_llava_loader_honours_device_and_dtype(video_stubs, args):
    path, make_inputs, tokenizer, stub = video_stubs
    lm = make("apet_video_llava", f"pretrained={path},{args}")
    want = torch.bfloat16 if "bfloat16" in args else torch.float32
    assert lm.model.dtype == want and lm.device == torch.device("cpu")
    assert next(lm.model.parameters()).device == torch.device("cpu")
    assert lm.tokenizer is tokenizer  # the stock wrapper never sets it
    assert is_patched(lm.model) == ("apet=false" not in args)
    lm.task_dict = {"t": {"test": [{"visual": "clip.mp4"}]}}
    (result,) = lm.generate_until([request()])
    assert stub.calls == ["USER: <video>what is it? ASSISTANT:"]  # the stock prompt
    counts = result.token_counts.to_dict()
    inputs = make_inputs(5, 6)
    length = inputs["input_ids"].shape[-1]
    frame = 37  # 1 + 6x6 tokens per frame (Video-LLaVA keeps the CLS token of video frames)
    visual = VIDEO_FRAMES * frame
    assert counts["uncompressed_tokens"] == length
    assert counts["output_tokens"] == MAX_NEW
    ref = transformers.VideoLlavaForConditionalGeneration.from_pretrained(path, dtype=want).eval()
    if "apet=false" in args:
        assert counts["input_tokens"] == counts["layer_tokens"] == length
    else:
        assert counts["input_tokens"] == counts["layer_tokens"] == length - visual + 8 * 32
        assert "apet_layer" not in counts  # video-llava/32 has no stage 2
        apply_apet(ref)
    # The stock wrapper decodes the whole sequence and keeps what follows "ASSISTANT:"; the
    # stub's prompt has none, so the answer is the decoded sequence, prompt included.
    with torch.inference_mode():
        out = ref.generate(
            **{**inputs, "pixel_values_videos": inputs["pixel_values_videos"].to(want)},
            max_new_tokens=MAX_NEW,  # the stock code passes the request's max_new_tokens
            do_sample=False,
        )
    assert result.text == tokenizer.batch_decode(out, skip_special_tokens=True)[0].strip()


def test_video_llava_bad_arguments(video_stubs):
    path = video_stubs[0]
    with pytest.raises(ApetEvalError, match="num_frames must be 8"):
        make("apet_video_llava", f"pretrained={path},num_frames=4")
    with pytest.raises(ApetEvalError, match="unknown preset 'x' for video_llava"):
        make("apet_video_llava", f"pretrained={path},preset=x")
