"""Background threads that serve concurrent queries in batches: one model call, one FAISS call.

Requests put ``(key, payload, future)`` on a queue. The thread takes the first, keeps collecting
for ``wait_ms`` (or until ``max_batch``), groups the batch by key and runs each group at once,
resolving each future with its own row. :class:`QueryEncoder` batches text and images through the
model (only its thread touches the model, so no lock is needed); :class:`SearchBatcher` batches kNN
searches per (collection, modality), which turns many exact (Flat) searches into one matrix product.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

import numpy as np
import torch

_STOP = object()


class _BatchingThread:
    """The queue, the collecting loop and the per-group error handling shared by both batchers."""

    def __init__(self, name: str, wait_ms: float, max_batch: int, on_batch=None):
        self.wait_s = wait_ms / 1000.0
        self.max_batch = max_batch
        self.on_batch = on_batch  # called with (key, size) after each group, for metrics
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _submit(self, key, payload) -> Future:
        future: Future = Future()
        self._queue.put((key, payload, future))
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
            groups: dict = {}
            for key, payload, future in batch:
                groups.setdefault(key, []).append((payload, future))
            for key, items in groups.items():
                futures = [future for _, future in items]
                try:
                    answers = self._run(key, [payload for payload, _ in items])
                except Exception as error:  # one bad group fails its requests, never the thread
                    for future in futures:
                        future.set_exception(error)
                    continue
                for future, answer in zip(futures, answers):
                    future.set_result(answer)
                if self.on_batch:
                    self.on_batch(key, len(items))

    def _run(self, key, payloads: list) -> list:
        raise NotImplementedError


class QueryEncoder(_BatchingThread):
    """Batches text and preprocessed image queries through a CLIP model on one thread."""

    def __init__(self, model, device, precision: str = "fp32", wait_ms: float = 3.0, max_batch: int = 64,
                 on_batch=None):
        self.model = model
        self.device = torch.device(device)
        self.precision = precision
        self.context_length = model.config.text.context_length
        super().__init__("clipforge-query-encoder", wait_ms, max_batch, on_batch)

    def encode_text(self, text: str) -> Future:
        """A future of the ``(dim,)`` float32 L2-normalised embedding of ``text``."""
        return self._submit("text", text)

    def encode_image(self, pixels: torch.Tensor) -> Future:
        """A future of the embedding of one preprocessed image ``(3, H, W)``."""
        return self._submit("image", pixels)

    @torch.no_grad()
    def _run(self, kind: str, payloads: list) -> np.ndarray:
        """``(len(payloads), dim)`` float32 L2-normalised embeddings."""
        from ..tokenizer import tokenize
        from ..runtime import autocast

        if kind == "text":
            inputs = tokenize(payloads, context_length=self.context_length, truncate=True).to(self.device)
        else:
            inputs = torch.stack(payloads).to(self.device)  # (B, 3, H, W)
        with autocast(self.device, self.precision):
            features = self.model.encode_text(inputs) if kind == "text" else self.model.encode_image(inputs)
        features = features.float()
        features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return features.cpu().numpy()


class SearchBatcher(_BatchingThread):
    """Batches kNN searches of one (collection, modality) into one FAISS call on one thread."""

    def __init__(self, wait_ms: float = 1.0, max_batch: int = 256, on_batch=None):
        self._collections: dict = {}
        super().__init__("clipforge-knn-search", wait_ms, max_batch, on_batch)

    def search(self, collection, query: np.ndarray, modality: str, k: int) -> Future:
        """A future of ``[(id, similarity), ...]`` (best first, at most ``k``) for one ``(dim,)`` query."""
        collection.check_query(query, modality)  # a bad query fails alone, before it joins a batch
        self._collections[collection.name] = collection
        return self._submit((collection.name, modality), (np.asarray(query, dtype=np.float32), int(k)))

    def _run(self, key: tuple, payloads: list) -> list:
        name, modality = key
        queries = np.stack([query for query, _ in payloads])  # (B, dim)
        scores, ids = self._collections[name].search(queries, modality, max(k for _, k in payloads))
        return [[(int(row_id), float(score)) for row_id, score in zip(ids[row, :k], scores[row, :k]) if row_id >= 0]
                for row, (_, k) in enumerate(payloads)]
