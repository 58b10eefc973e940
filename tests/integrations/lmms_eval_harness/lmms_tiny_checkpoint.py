"""Tiny checkpoints and a local lmms-eval task for the harness tests (no downloads).

``save_llava15(path)`` writes a LLaVA-1.5-shaped checkpoint a stock ``from_pretrained`` and
``AutoProcessor`` load: CLIP at 336 px with 14 px patches (576 visual tokens per image after the
CLS token is dropped, as in LLaVA-1.5), an 18-layer tiny Llama (so the paper's stage-2 layer 16
exists), a word-level tokenizer with an ``<image>`` token and a chat template.
``write_task(dir)`` writes a 4-sample visual QA task (YAML + parquet + utils.py) for
``--include_path``. ``save_qwen2_5_vl`` / ``save_video_llava`` write the tiny models of
``tests/integrations/tiny_vlms.py`` (Video-LLaVA with the stock wrapper's 8 frames) with a
word-level tokenizer over their whole vocabulary; their processors need torchvision, so the
tests build their inputs with the returned ``make_inputs``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import transformers
from integrations import tiny_vlms
from tokenizers import Tokenizer, models, pre_tokenizers

HERE = Path(__file__).parent
TASK_FILES = HERE / "task"
IMAGE_TOKEN = "<image>"
WORDS = (
    "USER ASSISTANT : ? . , what color shape is the of a an this image picture answer yes no "
    "red green blue circle square one two three word single using phrase question"
).split()
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN]
VISUAL_TOKENS = 576  # (336 / 14) ** 2
NUM_LAYERS = 18
PROJECTOR_SCALE = 2.0
CHAT_TEMPLATE = (
    "{% for message in messages %}USER: {{ message['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def save_llava15(path: Path) -> Path:
    """Write the tiny LLaVA-1.5 checkpoint (model, tokenizer, processor) to ``path``."""
    tokenizer = _tokenizer()
    vision = transformers.CLIPVisionConfig(
        image_size=336,
        patch_size=14,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
    )
    text = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),  # every id decodes to a word
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = transformers.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=VISUAL_TOKENS,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # distinct tokens, so that greedy answers are not all the same word
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
        # Louder visual tokens, so that compressing them changes the answers (the tests'
        # negative control needs the compressed and the stock answers to differ).
        for p in model.model.multi_modal_projector.parameters():
            p.mul_(PROJECTOR_SCALE)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    # Every answer is max_new_tokens words: no special token (EOS included) is ever generated,
    # so an empty answer can only come from a failure.
    model.generation_config.suppress_tokens = list(range(len(SPECIAL)))
    model.save_pretrained(path)
    image_processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    )
    _save_processor(path, transformers.LlavaProcessor, image_processor, tokenizer, patch_size=14)
    return path


def _save_processor(path: Path, processor_cls, image_processor, tokenizer, patch_size: int):
    """A LLaVA-family processor with the CLS token dropped and the tests' chat template. The
    image processors are the PIL ones: the default ones need torchvision, which CPU machines
    lack."""
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)


def write_task(directory: Path) -> Path:
    """Write the local tasks ``apet_tiny_vqa`` (generate_until, 4 samples) and ``apet_tiny_ll``
    (loglikelihood, same data) to ``directory``: YAML files, utils.py and data.parquet."""
    import datasets
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    for name in ("apet_tiny_vqa.yaml", "apet_tiny_ll.yaml", "utils.py"):
        shutil.copy(TASK_FILES / name, directory / name)
    colors = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
    rows = [("red", 64, 48), ("green", 300, 200), ("blue", 336, 336), ("red", 500, 120)]
    images, answers = [], []
    for i, (color, w, h) in enumerate(rows):
        image = Image.new("RGB", (w, h), colors[color])
        image.paste((255, 255, 255), (i * 7, i * 5, i * 7 + w // 3, i * 5 + h // 3))
        images.append(image)
        answers.append(color)
    data = datasets.Dataset.from_dict(
        {
            "question_id": list(range(len(rows))),
            "image": images,
            "question": ["what color is the image ?"] * len(rows),
            "answer": answers,
        },
        features=datasets.Features(
            question_id=datasets.Value("int64"),
            image=datasets.Image(),
            question=datasets.Value("string"),
            answer=datasets.Value("string"),
        ),
    )
    data.to_parquet(str(directory / "data.parquet"))
    return directory


def word_tokenizer(
    vocab_size: int, image_id: int | None = None
) -> transformers.PreTrainedTokenizerFast:
    """Token i is the word ``w<i>`` (pad 0, bos 1, eos 2, as in tiny_vlms.TEXT); with
    ``image_id``, that id is the special ``<image>`` token instead (a processor expands it)."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    extra = {}
    if image_id is not None:
        vocab[IMAGE_TOKEN] = vocab.pop(f"w{image_id}")
        extra = {"extra_special_tokens": {"image_token": IMAGE_TOKEN}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="w0", bos_token="w1", eos_token="w2", unk_token="w3",
        **extra,
    )  # fmt: skip


def save_qwen2_5_vl(path: Path):
    """tiny_vlms' Qwen2.5-VL (4 decoder layers) and a tokenizer; returns ``make_inputs``."""
    model, make_inputs = tiny_vlms.build_qwen2_5_vl()
    model.generation_config.suppress_tokens = tiny_vlms.SUPPRESS
    model.save_pretrained(path)
    word_tokenizer(tiny_vlms.TEXT["vocab_size"]).save_pretrained(path)
    return make_inputs


VIDEO_FRAMES = 8  # the stock video_llava wrapper pads every clip to 8 frames


def save_video_llava(path: Path):
    """A tiny Video-LLaVA (tiny_vlms' shapes, videos of 8 frames of 1 + 6x6 tokens) and a
    tokenizer; returns ``make_inputs(prompt)`` for one prompt with one video."""
    vision = transformers.CLIPVisionConfig(image_size=48, patch_size=8, **tiny_vlms.CLIP)
    cfg = transformers.VideoLlavaConfig(
        vision_config=vision,
        text_config=transformers.LlamaConfig(**tiny_vlms.TEXT),
        image_token_index=tiny_vlms.IMAGE_ID,
        video_token_index=tiny_vlms.VIDEO_ID,
        image_seq_length=36,
        video_seq_length=VIDEO_FRAMES * 37,
    )
    model = tiny_vlms._finish(transformers.VideoLlavaForConditionalGeneration, cfg, "sdpa")
    model.generation_config.suppress_tokens = tiny_vlms.SUPPRESS
    model.save_pretrained(path)
    word_tokenizer(tiny_vlms.TEXT["vocab_size"]).save_pretrained(path)

    def make_inputs(text_before: int, text_after: int) -> dict:
        g = torch.Generator().manual_seed(text_before)
        ids = [1, *range(10, 10 + text_before), *[tiny_vlms.VIDEO_ID] * (VIDEO_FRAMES * 37)]
        ids += list(range(40, 40 + text_after))
        return {
            "input_ids": torch.tensor([ids]),
            "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "pixel_values_videos": torch.randn(1, VIDEO_FRAMES, 3, 48, 48, generator=g),
        }

    return make_inputs


def save_llava_next(path: Path) -> Path:
    """tiny_vlms' LLaVA-NeXT (32 px crops of 4x4 tokens, grids up to 64x32 px) with its real
    processor (the PIL image processor: the default one needs torchvision) and a word-level
    tokenizer over the whole vocabulary whose ``IMAGE_ID`` is the special ``<image>`` token."""
    model, _ = tiny_vlms.build_llava_next()
    model.generation_config.suppress_tokens = tiny_vlms.SUPPRESS
    model.save_pretrained(path)
    tokenizer = word_tokenizer(tiny_vlms.TEXT["vocab_size"], image_id=tiny_vlms.IMAGE_ID)
    image_processor = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
        image_grid_pinpoints=model.config.image_grid_pinpoints,
    )  # fmt: skip
    _save_processor(path, transformers.LlavaNextProcessor, image_processor, tokenizer, patch_size=8)
    return path
