"""Write tiny random LLaVA-OneVision and LLaVA-NeXT-Video checkpoints and record transformers'
outputs on them (float32), for tests/test_onevision.py.

    pip install torch==2.13.0 && python tests/fixtures/make_onevision_fixtures.py

(the script calls `main` here; tests/test_oracle_live.py runs `write_checkpoint` live).

Checkpoints (tests/fixtures/data/<name>/), each with oracle.npz and oracle.json:

- ov-hub: LlavaOnevision (SigLIP, no CLS, 35-px tiles of 7-px patches = 5 x 5 features; Qwen2
  with GQA and tied embeddings), llava-hf hub key layout; "anyres_max_1", so that the wide and
  the tall picture's grids are bilinearly downsampled.
- ov-v5: the same shapes, untied embeddings, transformers 5 `save_pretrained` layout.
- nv-hub: LlavaNextVideo (CLIP-28 with CLS, 4 x 4 features, Llama), hub layout, average pooling.
- nv-v5: the same with the strided-convolution pooling ("conv"), transformers 5 layout.
- ov-orig (+ ov-orig-siglip): ov-hub's weights as an original lmms-lab release saves them
  (`LlavaQwenForCausalLM`: `model.*`, `model.mm_projector.{0,2}`, the SigLIP tower inside
  without its last layer, an lmms-style config with "(1x1),...,(3x3)" pinpoints, a tokenizer
  without <image>), and a SigLIP folder for its `mm_vision_tower`: its oracle is ov-hub's
  (`oracle_of`), as llava-hf's conversion of those releases renames the same tensors.

Cases: `wide`, `tall` (one picture), `two` (both pictures in one prompt: OneVision sees each
whole), `video` (8 frames, given as uint8 arrays: `video_frames` in the npz) and `mixed` (the
tall picture and the video). Per case: the processor's `pixel_values` (tiles concatenated,
channels first) / `pixel_values_videos`, `input_ids`, the last position's logits, and 24 greedy
tokens (EOS never ends them early).

transformers' video processors need torchvision, which does not load beside torch 2.13 here:
the frames are preprocessed by its PIL image processor (resize, rescale, normalize: the video
processors' steps), and each `<video>` is expanded by the processor's own `replace_video_token`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    LlavaNextImageProcessorPil,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
)
from transformers.processing_utils import ProcessorMixin

from .tokenizer_builder import build_tokenizer

DATA = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "data"
IMAGES = DATA / "images"
NUM_GREEDY = 24
FRAMES = 8
IMAGE_ID, PAD_ID, VIDEO_ID, EOS_ID = 384, 385, 386, 2
VOCAB = 400
OV_PINPOINTS = [[h, w] for h in (35, 70, 105) for w in (35, 70, 105)]
NV_PINPOINTS = [[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]
QUESTIONS = {
    "wide": "<image>\nWhat is in the picture?",
    "tall": "<image>\nDescribe this image in detail.",
    "two": "<image>\n<image>\nCompare the two pictures.",
    "video": "<video>\nWhat happens in the video?",
    "mixed": "<image>\n<video>\nIs the picture in the video?",
}
TEMPLATE = "USER: {q} ASSISTANT:"


def _skip_video_processor_check() -> None:
    """LlavaOnevisionProcessor / LlavaNextVideoProcessor check their video processor's class,
    which needs torchvision: let them be built without one."""
    check = ProcessorMixin.check_argument_for_proper_class

    def lenient(self, name, arg):
        return None if name == "video_processor" else check(self, name, arg)

    ProcessorMixin.check_argument_for_proper_class = lenient


def video_frames() -> np.ndarray:
    """8 frames (uint8 [8, 40, 56, 3]) of a square moving across a gradient."""
    y, x = np.mgrid[0:40, 0:56]
    frames = []
    for t in range(FRAMES):
        frame = np.stack([x * 4, y * 6, np.full_like(x, 40 + 20 * t)], axis=-1)
        frame[10:22, 4 + 6 * t : 16 + 6 * t] = [250, 30, 30]
        frames.append(frame.clip(0, 255).astype(np.uint8))
    return np.stack(frames)


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Matrices N(0, 1/fan_in) (the decoder's x0.5), norms 1 + 0.1 N, biases 0.1 N: outputs far
    from degenerate, greedy margins wide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if name.endswith("bias"):
                param.copy_(0.1 * noise)
            elif param.ndim == 1 and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif param.ndim == 1:  # image_newline
                param.copy_(noise)
            else:
                fan_in = int(np.prod(param.shape[1:]))
                scale = 0.5 if ".layers." in name and "language_model" in name else 1.0
                param.copy_(noise * fan_in**-0.5 * scale)


def hub_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers 5's names -> the llava-hf hub layout (transformers < 4.52)."""
    renames = [
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.image_newline", "image_newline"),
        ("model.vision_resampler.", "vision_resampler."),
    ]
    out = {}
    for key, value in state.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


def ov_config(tied: bool) -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(
        vision_config=dict(
            model_type="siglip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=35,
            patch_size=7,
            vision_use_head=False,
        ),
        text_config=dict(
            model_type="qwen2",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            rope_theta=1e6,
            max_position_embeddings=4096,
            tie_word_embeddings=tied,
        ),
        image_token_index=IMAGE_ID,
        video_token_index=VIDEO_ID,
        image_grid_pinpoints=OV_PINPOINTS,
        vision_aspect_ratio="anyres_max_1",
        tie_word_embeddings=tied,
        pad_token_id=PAD_ID,
    )


def nv_config(mode: str) -> LlavaNextVideoConfig:
    return LlavaNextVideoConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=28,
            patch_size=7,
            projection_dim=32,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=4096,
        ),
        image_token_index=IMAGE_ID,
        video_token_index=VIDEO_ID,
        image_grid_pinpoints=NV_PINPOINTS,
        spatial_pool_mode=mode,
        pad_token_id=PAD_ID,
    )


def processors(kind: str, tokenizer):
    """(transformers' processor, the PIL image processor that stands in for its video one)."""
    if kind == "ov":
        image = LlavaOnevisionImageProcessorPil(
            size={"height": 35, "width": 35}, image_grid_pinpoints=OV_PINPOINTS
        )
        processor = LlavaOnevisionProcessor(
            image_processor=image,
            tokenizer=tokenizer,
            video_processor=None,
            num_image_tokens=25,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_1",
        )
        frames = CLIPImageProcessorPil(
            size={"height": 35, "width": 35}, do_center_crop=False, resample=3
        )
        return processor, frames
    image = LlavaNextImageProcessorPil(
        size={"shortest_edge": 28},
        crop_size={"height": 28, "width": 28},
        image_grid_pinpoints=NV_PINPOINTS,
    )
    processor = LlavaNextVideoProcessor(
        image_processor=image,
        tokenizer=tokenizer,
        video_processor=None,
        patch_size=7,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    frames = CLIPImageProcessorPil(
        size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, resample=3
    )
    return processor, frames


def preprocessor_config(kind: str) -> dict:
    """The checkpoint's preprocessor_config.json, as the hub repos spell it."""
    common = dict(
        do_convert_rgb=True,
        do_normalize=True,
        do_rescale=True,
        do_resize=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        resample=3,
        rescale_factor=1 / 255,
    )
    if kind == "ov":
        return dict(
            common,
            do_pad=True,
            image_grid_pinpoints=OV_PINPOINTS,
            image_processor_type="LlavaOnevisionImageProcessor",
            processor_class="LlavaOnevisionProcessor",
            size={"height": 35, "width": 35},
        )
    return dict(
        common,
        crop_size={"height": 28, "width": 28},
        do_center_crop=True,
        image_grid_pinpoints=NV_PINPOINTS,
        image_processor_type="LlavaNextImageProcessor",
        processor_class="LlavaNextVideoProcessor",
        size={"shortest_edge": 28},
    )


def inputs_for(case: str, kind: str, processor, frame_processor, frames: np.ndarray) -> dict:
    """transformers' model inputs for one case (pictures nested per prompt, as chat templates
    give them: two in one prompt are `batch_num_images` [2])."""
    text = TEMPLATE.format(q=QUESTIONS[case])
    pictures = {
        "wide": ["wide"],
        "tall": ["tall"],
        "two": ["wide", "tall"],
        "video": [],
        "mixed": ["tall"],
    }[case]
    images = [Image.open(IMAGES / f"{p}.png").convert("RGB") for p in pictures]
    video = None
    if "<video>" in text:
        video = frame_processor(list(frames), return_tensors="pt")["pixel_values"][None]
        count = processor.replace_video_token({"pixel_values_videos": video}, 0).count("<video>")
        text = text.replace("<video>", "<video>" * count)
        processor.validate_inputs = lambda **kwargs: None  # the <video> tokens are expanded
    inputs = processor(text=[text], images=[images] if images else None, return_tensors="pt")
    if video is not None:
        inputs["pixel_values_videos"] = video
    return dict(inputs)


def greedy(model, inputs: dict) -> tuple[np.ndarray, float]:
    out = model.generate(
        **inputs,
        do_sample=False,
        max_new_tokens=NUM_GREEDY,
        min_new_tokens=NUM_GREEDY,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        temperature=None,
        top_p=None,
        top_k=None,
        return_dict_in_generate=True,
        output_logits=True,
    )
    new = out.sequences[0, inputs["input_ids"].shape[1] :]
    steps = torch.stack(out.logits, dim=1)[0]
    top2 = steps.topk(2, dim=-1).values
    assert bool((steps.argmax(-1) == new).all())
    return new.numpy().astype(np.int32), float((top2[:, 0] - top2[:, 1]).min())


def write_checkpoint(
    folder: Path, kind: str, layout: str, option, seed: int, tokenizer=None
) -> Path:
    """Write one checkpoint and its oracle into `folder` (`option`: tied embeddings for "ov",
    the pooling mode for "nv")."""
    tokenizer = tokenizer or make_tokenizer()
    name = folder.name
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if kind == "ov":
        config, model_class = ov_config(tied=option), LlavaOnevisionForConditionalGeneration
    else:
        config, model_class = nv_config(mode=option), LlavaNextVideoForConditionalGeneration
    config._attn_implementation = "eager"
    model = model_class(config).eval()
    randomize_(model, seed)
    if kind == "ov" and option:
        model.tie_weights()
    if layout == "v5":
        model.save_pretrained(folder)
    else:
        from safetensors.torch import save_file

        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(hub_keys(state), folder / "model.safetensors", metadata={"format": "pt"})
        config_dict = config.to_dict()
        config_dict["architectures"] = [model_class.__name__]
        (folder / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
    tokenizer.save_pretrained(folder)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (folder / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(kind), indent=2) + "\n"
    )

    processor, frame_processor = processors(kind, tokenizer)
    frames = video_frames()
    arrays, margins, counts = {"video_frames": frames}, {}, {}
    cases = ["wide", "tall", "two", "video", "mixed"]
    if kind == "nv":  # LLaVA-NeXT tiles every picture: "tall" and "two" add nothing here
        cases = ["wide", "video", "mixed"]
    with torch.no_grad():
        for case in cases:
            inputs = inputs_for(case, kind, processor, frame_processor, frames)
            logits = model(**inputs).logits[0, -1]
            tokens, margins[case] = greedy(model, inputs)
            pixels = inputs.get("pixel_values")
            if pixels is not None:
                if pixels.ndim == 5:  # [pictures, tiles (padded), C, H, W] -> the tiles used
                    pixels = torch.cat([p[:n] for p, n in zip(pixels, _tiles(model, inputs))])
                arrays[f"{case}_pixel_values"] = pixels.numpy().astype(np.float32)
                arrays[f"{case}_image_sizes"] = np.asarray(inputs["image_sizes"], np.int32)
            if "pixel_values_videos" in inputs:
                arrays[f"{case}_pixel_values_videos"] = inputs["pixel_values_videos"].numpy()
            arrays[f"{case}_input_ids"] = inputs["input_ids"].numpy().astype(np.int32)
            arrays[f"{case}_last_logits"] = logits.numpy().astype(np.float32)
            arrays[f"{case}_greedy_tokens"] = tokens
            ids = inputs["input_ids"][0]
            counts[case] = {
                "image": int((ids == IMAGE_ID).sum()),
                "video": int((ids == VIDEO_ID).sum()),
            }
    np.savez_compressed(folder / "oracle.npz", **arrays)
    import transformers

    meta = {
        "checkpoint": name,
        "kind": kind,
        "layout": layout,
        "option": option,
        "seed": seed,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "template": TEMPLATE,
        "questions": {c: QUESTIONS[c] for c in cases},
        "tokens": counts,
        "greedy_tokens": NUM_GREEDY,
        "min_greedy_margins": margins,
    }
    (folder / "oracle.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(name, counts, {k: round(v, 4) for k, v in margins.items()})
    return folder


def _tiles(model, inputs) -> list[int]:
    """The tiles transformers uses of each picture's padded stack (`image_size_to_num_patches`,
    or 1 for a picture that shares its prompt)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        image_size_to_num_patches,
    )

    config, tile = model.config, model.config.vision_config.image_size
    counts = inputs.get("batch_num_images", [1] * len(inputs["image_sizes"]))
    alone = [int(n) == 1 for n in counts for _ in range(int(n))]
    return [
        (image_size_to_num_patches(size.tolist(), config.image_grid_pinpoints, tile) if one else 1)
        for size, one in zip(inputs["image_sizes"], alone)
    ]


def make_tokenizer():
    """The fixtures' Llama-like tokenizer with `<image>` 384, `<pad>` 385 and `<video>` 386."""
    _skip_video_processor_check()
    tokenizer = build_tokenizer(None)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<video>"]})
    ids = tokenizer.convert_tokens_to_ids(["<image>", "<pad>", "<video>"])
    assert ids == [IMAGE_ID, PAD_ID, VIDEO_ID], ids
    return tokenizer


ORIGINAL_RENAMES = [
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.vision_model.", "model.vision_tower.vision_tower.vision_model."),
    ("multi_modal_projector.linear_1.", "model.mm_projector.0."),
    ("multi_modal_projector.linear_2.", "model.mm_projector.2."),
    ("image_newline", "model.image_newline"),
]


def write_original(hub: Path, folder: Path) -> None:
    """`hub` (a tied OneVision checkpoint in the hub layout) as an lmms-lab release, and its
    tower's folder beside it (`<folder>-siglip`)."""
    from safetensors.torch import load_file, save_file

    config = json.loads((hub / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    folder.mkdir(parents=True, exist_ok=True)
    weights = {}
    for key, value in load_file(hub / "model.safetensors").items():
        for old, new in ORIGINAL_RENAMES:
            if key.startswith(old):
                weights[new + key[len(old) :]] = value
                break
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    original = {
        "architectures": ["LlavaQwenForCausalLM"],
        "model_type": "llava",
        **{k: text[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers")},
        **{k: text[k] for k in ("num_attention_heads", "num_key_value_heads", "vocab_size")},
        "rope_theta": text["rope_parameters"]["rope_theta"],
        "max_position_embeddings": text["max_position_embeddings"],
        "rms_norm_eps": text["rms_norm_eps"],
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "image_aspect_ratio": config["vision_aspect_ratio"],
        "image_grid_pinpoints": "(1x1),...,(3x3)",
        "mm_hidden_size": vision["hidden_size"],
        "mm_patch_merge_type": "spatial_unpad",
        "mm_projector_type": "mlp2x_gelu",
        "mm_spatial_pool_mode": "bilinear",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "google/siglip-so400m-patch14-384",
        "image_token_index": 151646,
    }
    (folder / "config.json").write_text(json.dumps(original, indent=2) + "\n")
    build_tokenizer(folder, image_token=False)
    meta = {"checkpoint": folder.name, "oracle_of": hub.name, "layout": "original"}
    (folder / "oracle.json").write_text(json.dumps(meta, indent=2) + "\n")
    tower = folder.parent / f"{folder.name}-siglip"
    tower.mkdir(exist_ok=True)
    # so400m's shape with one layer more: lmms-lab's tower drops its last layer.
    tower_config = dict(vision, num_hidden_layers=vision["num_hidden_layers"] + 1)
    (tower / "config.json").write_text(json.dumps(tower_config, indent=2) + "\n")
    (tower / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config("ov"), indent=2) + "\n"
    )


def main() -> None:
    tokenizer = make_tokenizer()
    write_checkpoint(DATA / "ov-hub", "ov", "hub", True, 11, tokenizer)
    write_checkpoint(DATA / "ov-v5", "ov", "v5", False, 12, tokenizer)
    write_checkpoint(DATA / "nv-hub", "nv", "hub", "average", 13, tokenizer)
    write_checkpoint(DATA / "nv-v5", "nv", "v5", "conv", 15, tokenizer)
    write_original(DATA / "ov-hub", DATA / "ov-orig")
