"""One background thread that encodes queries in batches: many concurrent requests, one model call.

Requests put ``(kind, payload, future)`` on a queue. The thread takes the first, keeps collecting
for ``wait_ms`` (or until ``max_batch``), then runs one ``encode_text`` over all texts and one
``encode_image`` over all images of the batch and resolves each future with its own row. The model
is only ever touched by this thread, so no lock is needed around it.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

import numpy as np
import torch

_STOP = object()


class QueryEncoder:
    """Batches text and preprocessed image queries through a CLIP model on one thread."""

    def __init__(self, model, device, precision: str = "fp32", wait_ms: float = 3.0, max_batch: int = 64,
                 on_batch=None):
        from ..runtime import autocast

        self.model = model
        self.device = torch.device(device)
        self.precision = precision
        self.context_length = model.config.text.context_length
        self.wait_s = wait_ms / 1000.0
        self.max_batch = max_batch
        self.on_batch = on_batch  # called with (kind, size) after each model call, for metrics
        self._autocast = lambda: autocast(self.device, precision)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="clipforge-query-encoder", daemon=True)
        self._thread.start()

    def encode_text(self, text: str) -> Future:
        """A future of the ``(dim,)`` float32 L2-normalised embedding of ``text``."""
        return self._submit("text", text)

    def encode_image(self, pixels: torch.Tensor) -> Future:
        """A future of the embedding of one preprocessed image ``(3, H, W)``."""
        return self._submit("image", pixels)

    def _submit(self, kind: str, payload) -> Future:
        future: Future = Future()
        self._queue.put((kind, payload, future))
        return future

    def close(self) -> None:
        """Stop the thread after the queued requests are answered."""
        self._queue.put(_STOP)
        self._thread.join(timeout=10)

    def _collect(self, first) -> tuple[list, bool]:
        """``first`` plus whatever arrives within the wait window; True when a stop was seen."""
        batch = [first]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, stopping = self._collect(first)
            for kind in ("text", "image"):
                items = [item for item in batch if item[0] == kind]
                if items:
                    self._run(kind, items)

    def _run(self, kind: str, items: list) -> None:
        futures = [future for _, _, future in items]
        try:
            embeddings = self._encode(kind, [payload for _, payload, _ in items])
        except Exception as error:  # one bad batch fails its requests, never the thread
            for future in futures:
                future.set_exception(error)
            return
        for future, row in zip(futures, embeddings):
            future.set_result(row)
        if self.on_batch:
            self.on_batch(kind, len(items))

    @torch.no_grad()
    def _encode(self, kind: str, payloads: list) -> np.ndarray:
        """``(len(payloads), dim)`` float32 L2-normalised embeddings."""
        from .. import tokenize

        if kind == "text":
            inputs = tokenize(payloads, context_length=self.context_length, truncate=True).to(self.device)
        else:
            inputs = torch.stack(payloads).to(self.device)  # (B, 3, H, W)
        with self._autocast():
            features = self.model.encode_text(inputs) if kind == "text" else self.model.encode_image(inputs)
        features = features.float()
        features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return features.cpu().numpy()
