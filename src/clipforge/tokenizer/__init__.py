"""CLIP's BPE tokenizer with OpenAI's ids: ``tokenize`` and the :class:`Tokenizer` behind it.

``bpe.py`` holds the tokenizer, ``clean.py`` the text cleaning (ftfy, HTML, whitespace) in front of
it, ``_batch_merge.py`` the numpy BPE that merges many new words at once, ``_long_merge.py`` the
O(n log n) merge of very long words, and ``_ftfy_anchors.py``
generated tables that let cleaning skip ftfy where it provably changes nothing.
"""
from .bpe import Tokenizer, get_tokenizer, tokenize

__all__ = ["Tokenizer", "get_tokenizer", "tokenize"]
