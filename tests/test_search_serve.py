"""The search service on a real uvicorn server: clip-retrieval's API, our endpoints, real FAISS."""
import base64
import json
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")
pytest.importorskip("pyarrow")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import clipforge  # noqa: E402
from _search_fixtures import build_search_fixture, start_server  # noqa: E402

MAX_K = 10  # below the collection's 27 rows, so the cap is visible


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return build_search_fixture(tmp_path_factory.mktemp("search"))


@pytest.fixture(scope="module")
def server(fixture):
    live = start_server(fixture, max_k=MAX_K)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


@torch.no_grad()
def encode_text(model, text):
    features = model.encode_text(clipforge.tokenize([text]))
    return (features / features.norm(dim=-1, keepdim=True))[0].numpy()


def exact_top(collection, modality, query, k):
    """Ids of the k rows with the highest inner product, by numpy."""
    scores = collection.vectors(range(collection.count), modality) @ (query / np.linalg.norm(query))
    return list(np.argsort(-scores, kind="stable")[:k]), scores


def read_collection(fixture, name="shapes"):
    from clipforge.search.collection import Collection
    return Collection(fixture.root / name)


def raw_get(port, path):
    """(status, body) of a GET sent byte for byte: no client normalises the path's dots first."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


# --- reading a collection -------------------------------------------------------------------------

def test_collection_reads_parts_in_numeric_order(fixture):
    from _search_fixtures import embed_rows
    collection = read_collection(fixture)
    image_embeddings, text_embeddings = embed_rows(fixture.model, fixture.rows)
    assert collection.count == 27 and len(list((fixture.shapes / "img_emb").iterdir())) == 14  # parts 0..13
    np.testing.assert_array_equal(collection.vectors(range(27), "image"), image_embeddings.astype(np.float32))
    np.testing.assert_array_equal(collection.vectors(range(27), "text"), text_embeddings.astype(np.float32))
    np.testing.assert_array_equal(collection.vectors([26, 3, 11, 20], "image"), image_embeddings[[26, 3, 11, 20]])
    assert [row["row"] for row in collection.rows(range(27))] == list(range(27))
    assert collection.rows([12])[0]["caption"] == fixture.rows.captions[12]


def test_index_search_matches_exact_search_and_applies_search_params(fixture):
    import faiss
    collection = read_collection(fixture)
    assert faiss.downcast_index(collection.indexes["text"].index).hnsw.efSearch == 64
    query = encode_text(fixture.model, "a purple triangle")
    for modality in ("image", "text"):
        scores, ids = collection.search(query[None], modality, 5)
        expected, exact_scores = exact_top(collection, modality, query, 5)
        assert list(ids[0]) == expected
        np.testing.assert_allclose(scores[0], exact_scores[expected], atol=1e-5)


def test_missing_index_file_means_exact_search_and_missing_text_is_refused(fixture, client):
    collection = read_collection(fixture, "imageonly")
    assert collection.modalities == ["image"] and collection.indexes["image"].exact
    answer = client.post("/knn-service", json={"text": "a red circle", "modality": "text", "indice_name": "imageonly"})
    assert answer.status_code == 400 and "no text embeddings" in answer.json()["error"]


def test_two_collections_with_one_name_are_refused(fixture, tmp_path):
    from clipforge.search.collection import load_collections
    shutil.copytree(fixture.imageonly, tmp_path / "imageonly")
    with pytest.raises(ValueError, match="two collections are named 'imageonly'"):
        load_collections([fixture.imageonly, tmp_path / "imageonly"])


# --- clip-retrieval's API ---------------------------------------------------------------------

def clip_client_body(**fields):
    """The body clip-retrieval's ClipClient posts (every field, nulls included, no content type)."""
    body = {"text": None, "image": None, "image_url": None, "embedding_input": None, "deduplicate": False,
            "use_safety_model": True, "use_violence_detector": True, "indice_name": "shapes", "use_mclip": False,
            "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image", "num_images": 5,
            "num_result_ids": 5, "verbose": False}
    return json.dumps({**body, **fields})


def test_knn_service_answers_clip_client_text_query_like_exact_search(fixture, client):
    answer = client.post("/knn-service", content=clip_client_body(text="a green square"))
    assert answer.status_code == 200
    results = answer.json()
    expected, scores = exact_top(read_collection(fixture), "image", encode_text(fixture.model, "a green square"), 5)
    assert [result["id"] for result in results] == expected
    np.testing.assert_allclose([result["similarity"] for result in results], scores[expected], atol=1e-4)
    first = results[0]
    assert {"id", "similarity", "image_path", "caption", "captions", "url"} <= set(first)
    assert first["image_path"] == fixture.rows.image_paths[first["id"]]
    assert first["url"].endswith(f"/image/{first['id']}?indice=shapes")
    assert client.get(first["url"]).status_code == 200


def test_knn_service_image_base64_and_embedding_input(fixture, client):
    with open(fixture.rows.image_paths[7], "rb") as file:  # the blue square
        encoded = base64.b64encode(file.read()).decode()
    results = client.post("/knn-service", content=clip_client_body(image=encoded)).json()
    assert results[0]["id"] == 7 and results[0]["similarity"] > 0.99
    data_url = client.post("/knn-service", content=clip_client_body(image_url="data:image/png;base64," + encoded))
    assert data_url.json()[0]["id"] == 7
    stored = read_collection(fixture).vectors([13], "image")[0].tolist()
    results = client.post("/knn-service", content=clip_client_body(embedding_input=stored)).json()
    assert results[0]["id"] == 13


def test_knn_service_text_modality_searches_captions(fixture, client):
    results = client.post("/knn-service", content=clip_client_body(text="a yellow circle", modality="text")).json()
    assert results[0]["caption"] == "a yellow circle" and results[0]["similarity"] > 0.99


def test_knn_service_deduplicate_folds_cosine_094_neighbours(fixture, client):
    collection = read_collection(fixture)
    with open(fixture.rows.image_paths[0], "rb") as file:  # the red circle, stored twice (ids 0 and 24)
        encoded = base64.b64encode(file.read()).decode()
    full = client.post("/knn-service", content=clip_client_body(image=encoded, num_images=10, num_result_ids=10)).json()
    folded = client.post("/knn-service", content=clip_client_body(image=encoded, num_images=10, num_result_ids=10,
                                                                  deduplicate=True)).json()
    full_ids, kept_ids = [r["id"] for r in full], [r["id"] for r in folded]
    assert {0, 24} <= set(full_ids) and len({0, 24} & set(kept_ids)) == 1
    vectors = collection.vectors(full_ids, "image")
    cosine = vectors @ vectors.T / np.outer(np.linalg.norm(vectors, axis=1), np.linalg.norm(vectors, axis=1))
    kept = [full_ids.index(row_id) for row_id in kept_ids]
    assert kept == sorted(kept)  # rank order kept
    assert all(cosine[i, j] < 0.94 for i in kept for j in kept if i != j)
    dropped = [position for position in range(len(full_ids)) if position not in kept]
    assert dropped and all(max(cosine[p, q] for q in range(len(full_ids)) if q != p) >= 0.94 for p in dropped)


def test_metadata_and_indices_list(fixture, client):
    assert client.get("/indices-list").json() == ["shapes", "imageonly"]
    answer = client.post("/metadata", content=json.dumps({"ids": [3, 0, 26], "indice_name": "shapes"})).json()
    assert [item["id"] for item in answer] == [3, 0, 26]
    assert answer[0]["metadata"]["caption"] == fixture.rows.captions[3]
    assert answer[2]["metadata"]["image_path"] is None and answer[2]["metadata"]["source"] == "fixture"
    assert client.post("/metadata", json={"ids": [], "indice_name": "shapes"}).json() == []


def test_k_is_capped(client):
    results = client.post("/knn-service", content=clip_client_body(text="a shape", num_images=500,
                                                                   num_result_ids=500)).json()
    assert len(results) == MAX_K
    assert len(client.get("/search", params={"q": "a shape", "k": 999, "dedup": 0}).json()["results"]) == MAX_K


# --- our own endpoints ------------------------------------------------------------------------

def test_search_by_text_and_by_uploaded_image(fixture, client):
    answer = client.get("/search", params={"q": "a cyan square", "k": 5, "modality": "text"}).json()
    assert answer["results"][0]["caption"] == "a cyan square"
    assert answer["results"][0]["thumb"] == "/thumb/22?indice=shapes"
    with open(fixture.rows.image_paths[16], "rb") as file:  # row 16: the orange square
        upload = file.read()
    answer = client.post("/search", files={"image": ("query.png", upload, "image/png")}, data={"k": "3", "dedup": "0"})
    assert answer.status_code == 200
    assert answer.json()["results"][0]["id"] == 16 and len(answer.json()["results"]) == 3


def test_similar_finds_the_row_and_its_duplicate(client):
    results = client.get("/similar/0", params={"k": 5, "dedup": 0}).json()["results"]
    assert {results[0]["id"], results[1]["id"]} == {0, 24}
    folded = client.get("/similar/0", params={"k": 5}).json()["results"]
    assert folded[0]["id"] in (0, 24) and [item["id"] for item in folded[0]["folded"]] == [({0, 24} - {folded[0]["id"]}).pop()]


def test_image_and_thumbnail_by_id(fixture, client):
    from PIL import Image
    import io
    original = client.get("/image/5")
    assert original.status_code == 200 and original.content == open(fixture.rows.image_paths[5], "rb").read()
    assert original.headers["content-type"] == "image/png" and "sandbox" in original.headers["content-security-policy"]
    thumb = client.get("/thumb/5")
    assert thumb.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(thumb.content))
    assert image.format == "JPEG" and max(image.size) <= 256
    assert client.get("/thumb/5").content == thumb.content


def test_collections_describe_their_indexes(client):
    described = {item["name"]: item for item in client.get("/collections").json()}
    assert described["shapes"]["modalities"] == ["image", "text"] and described["shapes"]["dim"] == 32
    assert described["shapes"]["indexes"]["text"] == {"factory": "HNSW16", "exact": False,
                                                      "search_params": "efSearch=64"}
    assert described["imageonly"]["indexes"]["image"]["exact"] is True


def test_health_and_metrics(client):
    assert client.get("/health").json() == {"status": "ok", "collections": {"shapes": 27, "imageonly": 27}}
    client.get("/search", params={"q": "x", "k": "oops"})
    text = client.get("/metrics").text
    assert re.search(r'clipforge_http_requests_total\{route="/search",method="GET",status="400"\} \d+', text)
    assert re.search(r'clipforge_http_errors_total\{route="/search"\} [1-9]', text)
    buckets = [int(value) for value in re.findall(r'duration_seconds_bucket\{route="/health",le="[^"]+"\} (\d+)', text)]
    count = int(re.search(r'duration_seconds_count\{route="/health"\} (\d+)', text).group(1))
    assert buckets == sorted(buckets) and buckets[-1] == count >= 1
    assert re.search(r'clipforge_encoder_batch_size_count\{kind="text"\} [1-9]', text)
    assert re.search(r'clipforge_knn_batch_size_count\{kind="image"\} [1-9]', text)


# --- security and bad input -------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/image/../../etc/passwd", "/image/..%2F..%2Fetc%2Fpasswd", "/image/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/image//etc/passwd", "/image/%2Fetc%2Fpasswd", "/thumb/..%2f..%2fetc%2fpasswd", "/image/-1", "/thumb/-1",
    "/image/27", "/image/99999999999999999999", "/image/1.5", "/image/25", "/thumb/25", "/image/26",
    "/static/../service.py", "/static/..%2fservice.py", "/static/collection.py", "/static/%2e%2e/_inputs.py",
    "/image/3?indice=../shapes", "/image/3?indice=%2Fetc",
])
def test_no_request_path_reaches_the_filesystem(server, path):
    status, body = raw_get(server.port, path)
    assert 400 <= status < 500, (path, status)
    assert b"root:" not in body and b"import" not in body and b"\x89PNG" not in body
    if body:
        assert "error" in json.loads(body)


@pytest.mark.parametrize("host, status", [("evil.example", 400), ("evil.example:1234", 400),
                                          ("127.0.0.1.evil.example", 400), ("localhost:8080", 200), ("[::1]:80", 200)])
def test_only_loopback_host_names_are_answered(server, host, status):
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
        conn.sendall(f"GET /indices-list HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert int(head.split()[1]) == status
    assert ("error" in json.loads(body)) == (status == 400)


def test_cross_origin_reads_only_for_origins_given(fixture, client):
    refused = client.post("/knn-service", content=clip_client_body(text="a red circle"),
                          headers={"Origin": "http://evil.example"})
    assert refused.status_code == 200 and "access-control-allow-origin" not in refused.headers
    live = start_server(fixture, cors_origins=("http://front.example",))
    try:
        allowed = httpx.post(f"{live.url}/knn-service", content=clip_client_body(text="a red circle"),
                             headers={"Origin": "http://front.example"})
        assert allowed.headers["access-control-allow-origin"] == "http://front.example"
        preflight = httpx.options(f"{live.url}/knn-service", headers={
            "Origin": "http://front.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 200
        other = httpx.post(f"{live.url}/knn-service", content=clip_client_body(text="a red circle"),
                           headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    finally:
        live.stop()


def test_symlink_out_of_the_image_root_is_not_served_but_is_searchable(fixture, client):
    collection = read_collection(fixture)
    assert collection.image_root == (fixture.root / "images").resolve()
    assert collection.image_file(25) is None and collection.image_file(24) is not None
    results = client.post("/knn-service", content=clip_client_body(embedding_input=collection.vectors([25], "image")[0]
                                                                   .tolist())).json()
    assert results[0]["id"] in (3, 25) and all("url" not in r for r in results if r["id"] == 25)


def test_indexed_file_that_is_no_longer_an_image_is_not_served(tmp_path):
    fixture = build_search_fixture(tmp_path)
    Path(fixture.rows.image_paths[2]).write_bytes(b"<html><script>alert(1)</script></html>")
    live = start_server(fixture)
    try:
        for route in ("image", "thumb"):
            answer = httpx.get(f"{live.url}/{route}/2")
            assert answer.status_code == 404 and "script" not in answer.text
    finally:
        live.stop()


def test_unexpected_failure_is_a_bare_json_500_without_traceback(fixture):
    import copy
    broken = copy.deepcopy(fixture.model)

    def fail(tokens):
        raise RuntimeError("secret internal detail")
    broken.encode_text = fail
    original, fixture.model = fixture.model, broken
    try:
        live = start_server(fixture)
    finally:
        fixture.model = original
    try:
        answer = httpx.get(f"{live.url}/search", params={"q": "a red circle"})
        assert answer.status_code == 500 and answer.json() == {"error": "internal server error"}
        assert httpx.get(f"{live.url}/health").status_code == 200  # the encoder thread survived
    finally:
        live.stop()


BAD_KNN_BODIES = [
    b"{not json", b"[1, 2]", b"\xff\xfe", b"",
    clip_client_body(image="!!!not base64!!!"),
    clip_client_body(image=base64.b64encode(b"hello, not an image").decode()),
    clip_client_body(image_url="http://example.com/cat.jpg"),
    clip_client_body(image_url="file:///etc/passwd"),
    clip_client_body(embedding_input=[0.1, 0.2]),
    clip_client_body(embedding_input=["a"] * 32),
    clip_client_body(text="x", modality="audio"),
    clip_client_body(text="x", num_images="many"),
    clip_client_body(text="x", num_images=-4),
    clip_client_body(text="x", indice_name="../shapes"),
    clip_client_body(text="x" * 5000),
    clip_client_body(),
]


@pytest.mark.parametrize("body", BAD_KNN_BODIES, ids=range(len(BAD_KNN_BODIES)))
def test_bad_knn_requests_get_a_4xx_json_error(client, body):
    answer = client.post("/knn-service", content=body)
    assert 400 <= answer.status_code < 500 and answer.json()["error"]
    assert "Traceback" not in answer.text


@pytest.mark.parametrize("request_args", [
    dict(method="POST", url="/search", files={"image": ("a.txt", b"plain text", "text/plain")}),
    dict(method="POST", url="/search", data={"k": "3"}),
    dict(method="POST", url="/search", content=b"garbage", headers={"content-type": "multipart/form-data; boundary=x"}),
    dict(method="GET", url="/search"),
    dict(method="GET", url="/search?q=cat&k=-3"),
    dict(method="GET", url="/search?q=cat&modality=video"),
    dict(method="GET", url="/search?q=cat&indice=nope"),
    dict(method="POST", url="/metadata", json={"ids": ["x"], "indice_name": "shapes"}),
    dict(method="POST", url="/metadata", json={"ids": [27], "indice_name": "shapes"}),
    dict(method="POST", url="/metadata", json={"ids": 3}),
    dict(method="POST", url="/metadata", json={"ids": list(range(MAX_K + 1))}),
    dict(method="GET", url="/similar/abc"),
    dict(method="GET", url="/nowhere"),
    dict(method="DELETE", url="/health"),
], ids=range(14))
def test_bad_requests_get_a_4xx_json_error(client, request_args):
    answer = client.request(**request_args)
    assert 400 <= answer.status_code < 500 and answer.json()["error"]


def raw_post(port, path, headers, body_parts):
    """(status, JSON) of a POST written byte for byte, then read once everything is sent.

    A client that keeps writing after the 413 may see the connection close under it instead of the
    answer, so the tests send their bytes and only then read.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        conn.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{head}\r\n".encode())
        for part in body_parts:
            conn.sendall(part)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and data.rstrip().endswith(b"}"):
                break
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body[body.index(b"{"):body.rindex(b"}") + 1])


def test_bodies_over_10_mib_are_refused(server, client):
    limit = 10 * 1024 * 1024
    status, answer = raw_post(server.port, "/search", {"Content-Length": limit + 1,
                                                       "Content-Type": "multipart/form-data; boundary=x"}, [])
    assert status == 413 and "limit" in answer["error"]  # refused before any byte of the body is read
    mib = b"y" * (1024 * 1024)
    chunks = [b"%x\r\n%s\r\n" % (len(part), part) for part in [mib] * 10 + [b"z" * 1024]]
    status, answer = raw_post(server.port, "/knn-service", {"Transfer-Encoding": "chunked"}, chunks)
    assert status == 413 and "limit" in answer["error"]  # no length declared: counted as it streams
    assert client.get("/health").status_code == 200  # still serving


# --- concurrency --------------------------------------------------------------------------------

def test_encoder_batches_concurrent_queries_into_one_model_call(fixture):
    from clipforge.search._batcher import QueryEncoder
    sizes = []
    encoder = QueryEncoder(fixture.model, "cpu", wait_ms=500, on_batch=lambda kind, size: sizes.append((kind, size)))
    texts = [f"a {color} shape" for color in ("red", "green", "blue", "cyan", "black", "orange")]
    futures = [encoder.encode_text(text) for text in texts]
    batched = np.stack([future.result(timeout=60) for future in futures])
    encoder.close()
    assert sizes == [("text", 6)]
    alone = np.stack([encode_text(fixture.model, text) for text in texts])
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_searches_of_one_index_are_batched_into_one_faiss_call(fixture):
    from clipforge.search._batcher import SearchBatcher
    collection = read_collection(fixture)
    sizes = []
    searcher = SearchBatcher(wait_ms=500, on_batch=lambda key, size: sizes.append((key, size)))
    queries = collection.vectors([0, 5, 9, 14, 20], "text")
    futures = [searcher.search(collection, query, "image", k) for query, k in zip(queries, (1, 3, 5, 2, 4))]
    answers = [future.result(timeout=60) for future in futures]
    searcher.close()
    assert sizes == [(("shapes", "image"), 5)]
    for query, k, answer in zip(queries, (1, 3, 5, 2, 4), answers):
        scores, ids = collection.search(query[None], "image", k)
        assert [row_id for row_id, _ in answer] == list(ids[0])
        np.testing.assert_allclose([score for _, score in answer], scores[0], atol=1e-6)
    with pytest.raises(ValueError, match="has dim 32"):
        SearchBatcher().search(collection, np.zeros(7, np.float32), "image", 3)


def test_32_concurrent_clients_all_get_their_own_answer(fixture, server):
    from concurrent.futures import ThreadPoolExecutor
    from threading import Barrier
    queries = [f"a {color} {shape}" for color in ("red", "green", "blue", "cyan") for shape in
               ("circle", "square", "triangle", "blob")] * 2  # 32
    barrier = Barrier(len(queries))

    def ask(text):
        with httpx.Client(base_url=server.url, timeout=120) as http:
            barrier.wait()
            return http.get("/search", params={"q": text, "k": 3, "modality": "text", "dedup": 0})

    with ThreadPoolExecutor(len(queries)) as pool:
        answers = list(pool.map(ask, queries))
    assert [answer.status_code for answer in answers] == [200] * 32
    collection = read_collection(fixture)
    for text, answer in zip(queries, answers):
        expected, _ = exact_top(collection, "text", encode_text(fixture.model, text), 1)
        assert answer.json()["query"]["text"] == text and answer.json()["results"][0]["id"] == expected[0]
