"""Files of test and benchmark checkpoints that transformers would write."""

from __future__ import annotations

from mlx_llava.conversation import LLAVA_HF_CHAT_TEMPLATE
from mlx_llava.image_processor import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from mlx_llava.processor import IMAGE_PLACEHOLDER


def llava_hf_processor_files(
    image_size: int, patch_size: int, select_strategy: str = "default"
) -> dict[str, dict]:
    """The processor files of a llava-hf checkpoint (file name -> JSON content), as
    `LlavaProcessor.save_pretrained` writes them for a CLIP tower of this size; for writing test
    and benchmark checkpoints."""
    return {
        "preprocessor_config.json": {
            "crop_size": {"height": image_size, "width": image_size},
            "do_center_crop": True,
            "do_convert_rgb": True,
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": OPENAI_CLIP_MEAN,
            "image_processor_type": "CLIPImageProcessor",
            "image_std": OPENAI_CLIP_STD,
            "processor_class": "LlavaProcessor",
            "resample": 3,
            "rescale_factor": 0.00392156862745098,
            "size": {"shortest_edge": image_size},
        },
        "processor_config.json": {
            "image_token": IMAGE_PLACEHOLDER,
            "num_additional_image_tokens": 1,
            "patch_size": patch_size,
            "processor_class": "LlavaProcessor",
            "vision_feature_select_strategy": select_strategy,
        },
        "chat_template.json": {"chat_template": LLAVA_HF_CHAT_TEMPLATE},
    }
