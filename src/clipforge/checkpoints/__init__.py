"""CLIP checkpoints in every common layout: read without running code, written atomically.

``read.py`` loads OpenAI (TorchScript archives read as data), open_clip, Hugging Face and
clipforge checkpoints; ``architecture.py`` infers the :class:`~clipforge.models.ClipConfig` from
weight shapes; ``write.py`` saves clipforge folders and exports OpenAI and Hugging Face layouts.
The private helpers read files safely (``_files.py``), TorchScript archives (``_torchscript.py``)
and open_clip's Hub config (``_open_clip.py``), and map Hugging Face key names (``_hf_keys.py``).
"""
from ._files import FORMAT_VERSION, CheckpointError
from .architecture import infer_config
from .read import OPENAI_URLS, cache_dir, load, load_model, load_state_dict_any, released_weights_file
from .write import export_hf, export_openai, save

__all__ = ["CheckpointError", "FORMAT_VERSION", "OPENAI_URLS", "cache_dir", "export_hf", "export_openai",
           "infer_config", "load", "load_model", "load_state_dict_any", "released_weights_file", "save"]
