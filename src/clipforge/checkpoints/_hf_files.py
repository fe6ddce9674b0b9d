"""The tokenizer and image-processor files of a Hugging Face CLIP folder.

With them an exported folder works with ``CLIPProcessor``, ``AutoTokenizer`` and
``pipeline("zero-shot-image-classification", model=folder)``, not only ``CLIPModel``: the
vocabulary and merges are OpenAI's (the file clipforge's tokenizer reads), the context length is
the model's, and the preprocessing is OpenAI's (bicubic resize of the short side, centre crop,
OpenAI's mean and std).
"""
from __future__ import annotations

import gzip
import json

from ..tokenizer.bpe import EOT_TOKEN, NUM_MERGES, SOT_TOKEN, VOCAB_PATH, bytes_to_unicode
from ..transforms import OPENAI_MEAN, OPENAI_STD

_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as HF's image processors store it


def tokenizer_files(context_length: int) -> dict[str, str]:
    """File name -> text of ``vocab.json``, ``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``."""
    lines = gzip.decompress(VOCAB_PATH.read_bytes()).decode("utf-8").split("\n")
    merges = lines[1:NUM_MERGES + 1]  # line 0 is a header, as in OpenAI's file
    byte_symbols = list(bytes_to_unicode().values())
    vocab = [*byte_symbols, *(s + "</w>" for s in byte_symbols), *(m.replace(" ", "") for m in merges),
             SOT_TOKEN, EOT_TOKEN]
    special = {"bos_token": SOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN, "pad_token": EOT_TOKEN}
    config = {**special, "model_max_length": context_length, "tokenizer_class": "CLIPTokenizer",
              "processor_class": "CLIPProcessor", "do_lower_case": True, "errors": "replace",
              "add_prefix_space": False, "clean_up_tokenization_spaces": False}
    return {
        "vocab.json": json.dumps({symbol: index for index, symbol in enumerate(vocab)}, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
    }


def preprocessor_config(image_size: int) -> str:
    """The text of ``preprocessor_config.json``: OpenAI's preprocessing at ``image_size``."""
    config = {
        "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
        "do_resize": True, "size": {"shortest_edge": image_size}, "resample": _BICUBIC,
        "do_center_crop": True, "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(OPENAI_MEAN), "image_std": list(OPENAI_STD), "do_convert_rgb": True,
    }
    return json.dumps(config, indent=2) + "\n"
