"""The HTTP search service over embedded collections: clip-retrieval's API, our own, and a page.

clip-retrieval's endpoints (its ``ClipClient`` and web front work unchanged):

- ``GET /indices-list`` -> ``["name", ...]``
- ``POST /knn-service`` with ``{text | image (base64) | embedding_input, modality, num_images,
  num_result_ids, indice_name, deduplicate, ...}`` -> ``[{"id", "similarity", "image_path",
  "caption", ..., "url"}]``. ``use_mclip``, ``use_safety_model``, ``use_violence_detector``,
  ``aesthetic_score`` and ``aesthetic_weight`` are accepted and ignored; ``image_url`` is refused
  (this server never fetches anything) unless it is a base64 ``data:`` URL.
- ``POST /metadata`` with ``{ids, indice_name}`` -> ``[{"id", "metadata": {...}}]``

Ours: ``GET /search?q=&k=&modality=&indice=&dedup=``, ``POST /search`` (multipart field ``image``),
``GET /similar/{id}``, ``GET /image/{id}``, ``GET /thumb/{id}``, ``GET /collections``,
``GET /health``, ``GET /metrics`` (Prometheus text) and the page at ``/``.

Requests name ids, never paths (see :mod:`clipforge.search.collection` for which files are
served). Bodies over 10 MiB get 413; every bad input gets a 4xx ``{"error": "..."}``; an
unexpected failure gets a bare 500 ``{"error": "internal server error"}`` (the traceback goes to the
server's log, never to the client).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from urllib.parse import quote

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from ._batcher import SearchBatcher
from ._guard import GuardMiddleware
from ._inputs import (MAX_BODY_BYTES, MAX_K, RequestError, decode_base64, open_image, parse_count, parse_embedding,
                      parse_flag, parse_id, parse_json_object, parse_modality, parse_text)
from ._metrics import Metrics
from ._results import duplicate_groups, jsonable
from ._thumbs import ThumbnailCache, image_media_type

LOG = logging.getLogger("clipforge.search")
PAGE_DIR = Path(__file__).parent / "page"
PAGE_TYPES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
              "style.css": "text/css; charset=utf-8"}
PAGE_POLICY = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
DEFAULT_K = 40


class SearchService:
    """What the routes share: the collections, the batched query encoder and the thumbnail cache."""

    def __init__(self, collections: dict, encoder, preprocess, max_k: int = MAX_K):
        if not collections:
            raise ValueError("no collections to serve")
        self.collections = collections
        self.encoder = encoder
        self.searcher = SearchBatcher()
        self.preprocess = preprocess
        self.max_k = max_k
        self.thumbs = ThumbnailCache()

    def collection(self, name):
        """The collection called ``name`` (the first one when None or empty); 404 when unknown."""
        if name in (None, ""):
            return next(iter(self.collections.values()))
        if not isinstance(name, str) or name not in self.collections:
            raise RequestError(f"no collection named {str(name)[:80]!r}; see /indices-list", 404)
        return self.collections[name]

    async def embed_text(self, text: str) -> np.ndarray:
        """The ``(dim,)`` embedding of ``text`` (batched with concurrent queries)."""
        return await asyncio.wrap_future(self.encoder.encode_text(text))

    async def embed_image(self, data: bytes, name: str = "image") -> np.ndarray:
        """The ``(dim,)`` embedding of the image file bytes ``data``; 400 when they are not an image."""
        pixels = await run_in_threadpool(lambda: self.preprocess(open_image(data, name)))
        return await asyncio.wrap_future(self.encoder.encode_image(pixels))

    async def query_vector(self, body: dict, collection) -> np.ndarray:
        """The query of a ``/knn-service`` body: its text, base64 image or embedding, in that order."""
        if body.get("text") not in (None, ""):
            return await self.embed_text(parse_text(body["text"]))
        if body.get("image") not in (None, ""):
            return await self.embed_image(decode_base64(body["image"]))
        image_url = body.get("image_url")
        if image_url not in (None, ""):
            if isinstance(image_url, str) and image_url.startswith("data:"):
                return await self.embed_image(decode_base64(image_url, "image_url"), "image_url")
            raise RequestError("image_url: this server never fetches URLs; send the image itself, "
                               "base64-encoded, in 'image'")
        if body.get("embedding_input") is not None:
            return parse_embedding(body["embedding_input"], collection.dim)
        raise RequestError("send one of text, image (base64) or embedding_input")

    async def search(self, collection, query: np.ndarray, modality: str, k: int):
        """``[(id, similarity), ...]`` best first, from ``modality``'s index (batched with concurrent searches)."""
        try:
            future = self.searcher.search(collection, query, modality, k)
        except ValueError as error:  # no such modality, wrong dim
            raise RequestError(str(error)) from None
        return await asyncio.wrap_future(future)

    def fold(self, collection, hits: list, modality: str) -> list[list]:
        """``hits`` grouped into near-duplicates (cosine >= 0.94 between the results' embeddings)."""
        if len(hits) < 2:
            return [hits] if hits else []
        vectors = collection.vectors([row_id for row_id, _ in hits], modality)  # (k, dim)
        return [[hits[position] for position in group] for group in duplicate_groups(vectors)]


def _service(request: Request) -> SearchService:
    return request.app.state.service


def _links(collection, row_id: int) -> dict:
    """Relative links to a result's image and thumbnail (None when the file may not be served)."""
    if collection.image_file(row_id) is None:
        return {"image": None, "thumb": None}
    suffix = f"{row_id}?indice={quote(collection.name)}"
    return {"image": f"/image/{suffix}", "thumb": f"/thumb/{suffix}"}


# --- clip-retrieval's API -------------------------------------------------------------------------

async def indices_list(request: Request) -> JSONResponse:
    """``GET /indices-list``: the collection names."""
    return JSONResponse(list(_service(request).collections))


async def knn_service(request: Request) -> JSONResponse:
    """``POST /knn-service``: clip-retrieval's query, answered in its shape."""
    service = _service(request)
    body = parse_json_object(await request.body())
    collection = service.collection(body.get("indice_name"))
    modality = parse_modality(body.get("modality"))
    num_images = parse_count(body.get("num_images"), "num_images", DEFAULT_K, service.max_k)
    num_result_ids = parse_count(body.get("num_result_ids"), "num_result_ids", num_images, service.max_k)
    deduplicate = parse_flag(body.get("deduplicate"), "deduplicate")
    query = await service.query_vector(body, collection)
    hits = await service.search(collection, query, modality, num_result_ids)
    base = str(request.base_url).rstrip("/")
    return JSONResponse(await run_in_threadpool(_knn_results, service, collection, hits, modality, num_images,
                                                deduplicate, base))


def _knn_results(service, collection, hits, modality, num_images, deduplicate, base) -> list[dict]:
    """clip-retrieval's result list: metadata columns (first ``num_images`` hits), ``id``, ``similarity``."""
    if deduplicate:
        hits = [group[0] for group in service.fold(collection, hits, modality)]
    rows = collection.rows([row_id for row_id, _ in hits[:num_images]])
    results = []
    for rank, (row_id, similarity) in enumerate(hits):
        result = jsonable(rows[rank]) if rank < len(rows) else {}
        if rank < len(rows) and "url" not in result and collection.image_file(row_id) is not None:
            # clip-retrieval's front shows `url`; point it at our own by-id image route
            result["url"] = f"{base}/image/{row_id}?indice={quote(collection.name)}"
        result["id"] = row_id
        result["similarity"] = similarity
        results.append(result)
    return results


async def metadata(request: Request) -> JSONResponse:
    """``POST /metadata``: ``[{"id", "metadata"}]`` for the ids asked."""
    service = _service(request)
    body = parse_json_object(await request.body())
    collection = service.collection(body.get("indice_name"))
    ids = body.get("ids")
    if not isinstance(ids, list):
        raise RequestError("ids must be a list of integers")
    if len(ids) > service.max_k:
        raise RequestError(f"at most {service.max_k} ids per request, got {len(ids)}")
    try:
        rows = await run_in_threadpool(collection.rows, ids)
    except KeyError as error:
        raise RequestError(error.args[0]) from None
    return JSONResponse([{"id": row_id, "metadata": jsonable(row)} for row_id, row in zip(ids, rows)])


# --- our own API ----------------------------------------------------------------------------------

async def _answer(request: Request, collection, hits: list, modality: str, dedup: bool, query: dict) -> JSONResponse:
    """Our endpoints' answer: one entry per near-duplicate group (its best hit), the rest listed as folded."""
    results = await run_in_threadpool(_grouped_results, _service(request), collection, hits, modality, dedup)
    return JSONResponse({"indice": collection.name, "modality": modality, "query": query, "results": results})


def _grouped_results(service, collection, hits: list, modality: str, dedup: bool) -> list[dict]:
    groups = service.fold(collection, hits, modality) if dedup else [[hit] for hit in hits]
    rows = collection.rows([group[0][0] for group in groups])
    results = []
    for group, row in zip(groups, rows):
        row_id, similarity = group[0]
        results.append({"id": row_id, "similarity": similarity, "caption": jsonable(row.get("caption")),
                        **_links(collection, row_id),
                        "folded": [{"id": other_id, "similarity": other} for other_id, other in group[1:]]})
    return results


def _query_options(service: SearchService, params) -> tuple:
    """(collection, modality, k, dedup) from a query string or form."""
    collection = service.collection(params.get("indice") or params.get("indice_name"))
    modality = parse_modality(params.get("modality"))
    k = parse_count(params.get("k"), "k", DEFAULT_K, service.max_k)
    dedup = parse_flag(params.get("dedup"), "dedup", default=True)
    return collection, modality, k, dedup


async def search_text(request: Request) -> JSONResponse:
    """``GET /search?q=TEXT``: rows nearest to the text."""
    service = _service(request)
    collection, modality, k, dedup = _query_options(service, request.query_params)
    text = parse_text(request.query_params.get("q"), "q")
    hits = await service.search(collection, await service.embed_text(text), modality, k)
    return await _answer(request, collection, hits, modality, dedup, {"text": text})


async def search_image(request: Request) -> JSONResponse:
    """``POST /search`` with a multipart ``image`` file: rows nearest to the image."""
    service = _service(request)
    form = await request.form(max_files=1, max_fields=8, max_part_size=64 * 1024)
    params = {**request.query_params, **{key: value for key, value in form.items() if isinstance(value, str)}}
    collection, modality, k, dedup = _query_options(service, params)
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise RequestError("upload an image file in the multipart field 'image'")
    data = await upload.read()
    hits = await service.search(collection, await service.embed_image(data), modality, k)
    return await _answer(request, collection, hits, modality, dedup, {"image": upload.filename or "upload"})


def _row(service: SearchService, request: Request):
    """The collection and checked row id of an ``/{route}/{id}?indice=`` request."""
    collection = service.collection(request.query_params.get("indice") or request.query_params.get("indice_name"))
    row_id = parse_id(request.path_params["id"])
    try:
        return collection, collection.check_id(row_id)
    except KeyError as error:
        raise RequestError(error.args[0], 404) from None


async def similar(request: Request) -> JSONResponse:
    """``GET /similar/{id}``: "more like this", searched with the stored image (else text) embedding."""
    service = _service(request)
    collection, modality, k, dedup = _query_options(service, request.query_params)
    _, row_id = _row(service, request)
    source = "image" if "image" in collection.modalities else "text"
    hits = await service.search(collection, collection.vectors([row_id], source)[0], modality, k)
    return await _answer(request, collection, hits, modality, dedup, {"similar": row_id})


async def image(request: Request) -> Response:
    """``GET /image/{id}``: the indexed file of that id, if it may be served, typed by its content."""
    collection, row_id = _row(_service(request), request)
    path = collection.image_file(row_id)
    media_type = path and await run_in_threadpool(image_media_type, path)
    if not media_type:  # never let a file's name choose a browser-run type such as text/html
        raise RequestError(f"id {row_id} has no servable image", 404)
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "private, max-age=3600",
                                                              "Content-Security-Policy": "default-src 'none'; sandbox"})


async def thumb(request: Request) -> Response:
    """``GET /thumb/{id}``: a JPEG at most 256 px on its longer side, made once and kept in memory."""
    service = _service(request)
    collection, row_id = _row(service, request)
    path = collection.image_file(row_id)
    if path is None:
        raise RequestError(f"id {row_id} has no servable image", 404)
    data = await run_in_threadpool(service.thumbs.get, (collection.name, row_id), path)
    if data is None:
        raise RequestError(f"id {row_id}: its image could not be decoded", 404)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


async def list_collections(request: Request) -> JSONResponse:
    """``GET /collections``: each collection's count, dim, modalities, model and index types."""
    return JSONResponse([collection.describe() for collection in _service(request).collections.values()])


async def health(request: Request) -> JSONResponse:
    """``GET /health``: ok and the collection sizes."""
    return JSONResponse({"status": "ok", "collections": {name: collection.count for name, collection
                                                         in _service(request).collections.items()}})


async def metrics(request: Request) -> Response:
    """``GET /metrics``: Prometheus text format."""
    return Response(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _page_route(files: dict):
    async def page(request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        if name not in files:  # a fixed table, read at start-up: a request never names a file
            raise RequestError("not found", 404)
        return Response(files[name], media_type=PAGE_TYPES[name],
                        headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"})
    return page


# --- the app --------------------------------------------------------------------------------------

async def _request_error(request: Request, error: RequestError) -> JSONResponse:
    return JSONResponse({"error": error.message}, status_code=error.status)


async def _http_error(request: Request, error: HTTPException) -> JSONResponse:
    return JSONResponse({"error": error.detail or "error"}, status_code=error.status_code, headers=error.headers)


async def _server_error(request: Request, error: Exception) -> JSONResponse:
    LOG.exception("unexpected error answering %s %s", request.method, request.url.path, exc_info=error)
    return JSONResponse({"error": "internal server error"}, status_code=500)


def create_app(collections: dict, encoder, preprocess, max_k: int = MAX_K, max_body: int = MAX_BODY_BYTES,
               cors_origins: tuple = (), allowed_hosts: tuple = ()) -> Starlette:
    """The Starlette app serving ``collections`` (name -> Collection) with ``encoder`` (a QueryEncoder).

    ``preprocess`` turns a PIL image into the model's input tensor. ``cors_origins`` lists the
    origins allowed to call the API from a browser (e.g. a separately hosted clip-retrieval
    front); none by default, so other web sites cannot read your collection. ``allowed_hosts``
    limits the ``Host`` header (``LOOPBACK_HOSTS`` when bound to 127.0.0.1); empty: any.
    """
    files = {name: (PAGE_DIR / name).read_bytes() for name in PAGE_TYPES}
    page = _page_route(files)
    routes = [
        Route("/", page, methods=["GET"]),
        Route("/static/{name}", page, methods=["GET"]),
        Route("/indices-list", indices_list, methods=["GET"]),
        Route("/knn-service", knn_service, methods=["POST"]),
        Route("/metadata", metadata, methods=["POST"]),
        Route("/search", search_text, methods=["GET"]),
        Route("/search", search_image, methods=["POST"]),
        Route("/similar/{id}", similar, methods=["GET"]),
        Route("/image/{id}", image, methods=["GET"], name="image"),
        Route("/thumb/{id}", thumb, methods=["GET"]),
        Route("/collections", list_collections, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    metrics_registry = Metrics()
    middleware = [Middleware(GuardMiddleware, metrics=metrics_registry, routes=routes, max_body=max_body,
                             allowed_hosts=allowed_hosts)]
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                                     allow_headers=["Content-Type"]))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(encoder.close)
        await run_in_threadpool(app.state.service.searcher.close)

    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={RequestError: _request_error, HTTPException: _http_error,
                                        Exception: _server_error})
    app.state.service = SearchService(collections, encoder, preprocess, max_k)
    app.state.metrics = metrics_registry
    if hasattr(encoder, "on_batch") and encoder.on_batch is None:
        encoder.on_batch = metrics_registry.observe_batch
    app.state.service.searcher.on_batch = lambda key, size: metrics_registry.observe_batch(f"knn:{key[1]}", size)
    return app
