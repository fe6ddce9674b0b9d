"""clip-retrieval's own ``ClipClient`` (its unmodified source) querying ``clipforge serve``.

Runs when the ``clip_retrieval`` package can be found; only its ``clip_client.py`` is loaded (the
package's ``__init__`` imports its Flask back end and torch pins). Install without dependencies:
``pip install --no-deps clip-retrieval requests``.
"""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("faiss")
pytest.importorskip("uvicorn")
pytest.importorskip("requests")

from _search_fixtures import build_search_fixture, start_server  # noqa: E402

pytestmark = pytest.mark.slow  # trains, spawns processes or serves: left out of -m 'not slow'


def load_clip_client():
    spec = importlib.util.find_spec("clip_retrieval")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("clip-retrieval missing; run: pip install --no-deps clip-retrieval requests")
    path = Path(next(iter(spec.submodule_search_locations))) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_retrieval_clip_client", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    clip_client = load_clip_client()
    fixture = build_search_fixture(tmp_path_factory.mktemp("clip-client"))
    live = start_server(fixture)
    yield clip_client, fixture, live
    live.stop()


def test_clip_client_text_image_and_embedding_queries(served):
    clip_client, fixture, live = served
    client = clip_client.ClipClient(url=live.url + "/knn-service", indice_name="shapes", num_images=5,
                                    deduplicate=False)
    by_caption = clip_client.ClipClient(url=live.url + "/knn-service", indice_name="shapes", num_images=3,
                                        modality=clip_client.Modality.TEXT)
    assert by_caption.query(text="a purple circle")[0]["caption"] == "a purple circle"
    results = client.query(image=fixture.rows.image_paths[10])  # a local file: sent base64
    assert results[0]["id"] == 10 and results[0]["similarity"] > 0.99 and len(results) == 5
    assert results[0]["url"].startswith(live.url + "/image/10")
    similarities = [result["similarity"] for result in results]
    assert similarities == sorted(similarities, reverse=True)
    from clipforge.search.collection import Collection
    vector = Collection(fixture.shapes).vectors([19], "image")[0].tolist()
    assert client.query(embedding_input=vector)[0]["id"] == 19
    refused = client.query(image="http://example.com/cat.jpg")  # sent as image_url: never fetched
    assert "never fetches" in refused["error"]
