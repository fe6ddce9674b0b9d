"""One hash of a loader's batches, to compare two ways of loading the same epoch."""
from __future__ import annotations

import hashlib
import json


def batch_digest(batches) -> str:
    """One hash of the batches' pixels, tokens, keys and indices, in order."""
    hashed = hashlib.sha256()
    for batch in batches:
        hashed.update(batch.images.numpy().tobytes())
        hashed.update(batch.tokens.numpy().tobytes())
        hashed.update(json.dumps([batch.index, batch.keys]).encode())
    return hashed.hexdigest()
