"""Exported checkpoints are read by the libraries themselves, not only by clipforge.

- ``--to hf``: ``transformers.CLIPModel`` gives clipforge's embeddings, ``config.json`` says the
  architecture, and ``CLIPProcessor``, ``AutoTokenizer`` and the zero-shot pipeline work on the
  folder with clipforge's pixels, ids and probabilities (transformers is in the test extra).
- ``--to openai``: OpenAI's ``build_model`` loads the export strictly and gives clipforge's features:
  checked against a stored fixture made with OpenAI's code (tests/fixtures/openai_build_model),
  and live where OpenAI's code is installed.
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import clipforge
from clipforge import ClipConfig
from clipforge.cli import main

pytestmark = pytest.mark.slow  # trains, spawns processes or serves: left out of -m 'not slow'

FIXTURE = Path(__file__).parent / "fixtures" / "openai_build_model" / "openai_build_model_io.safetensors"
TOLERANCE = 1e-5
LABELS = ["a red circle", "a blue square", "a green triangle"]


def _shape_image(colour: str) -> Image.Image:
    """A real 64 x 64 PNG-like image: a coloured disc on white."""
    image = Image.new("RGB", (64, 64), "white")
    from PIL import ImageDraw

    ImageDraw.Draw(image).ellipse((10, 12, 50, 54), fill=colour)
    return image


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = clipforge.create_model("tiny-vit").eval()
    folder = tmp_path_factory.mktemp("hf") / "model"
    assert main(["convert", "tiny-vit-unused", str(folder), "--to", "hf"]) == 2  # not a file: refused
    clipforge.save(model, folder.parent / "cf")
    assert main(["convert", str(folder.parent / "cf"), str(folder), "--to", "hf"]) == 0
    return model, folder


def test_transformers_clipmodel_gives_the_same_embeddings_and_config(exported):
    transformers = pytest.importorskip("transformers")
    model, folder = exported
    hf = transformers.CLIPModel.from_pretrained(folder).eval()
    config = json.loads((folder / "config.json").read_text())
    assert config["projection_dim"] == model.config.embed_dim
    assert config["text_config"]["max_position_embeddings"] == model.config.text.context_length
    assert config["vision_config"]["image_size"] == model.config.vision.image_size
    assert config["vision_config"]["patch_size"] == model.config.vision.patch_size
    assert config["text_config"]["hidden_act"] == config["vision_config"]["hidden_act"] == "quick_gelu"
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    tokens = clipforge.tokenize(LABELS[:2], context_length=model.config.text.context_length)

    def features(output):
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    with torch.no_grad():
        assert (features(hf.get_image_features(pixel_values=images)) - model.encode_image(images)).abs().max() <= TOLERANCE
        assert (features(hf.get_text_features(input_ids=tokens)) - model.encode_text(tokens)).abs().max() <= TOLERANCE


def test_clipprocessor_gives_clipforges_pixels_and_ids(exported):
    transformers = pytest.importorskip("transformers")
    model, folder = exported
    processor = transformers.CLIPProcessor.from_pretrained(folder)
    image = _shape_image("red")
    _, preprocess = clipforge.load(folder)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert (pixels - preprocess(image)).abs().max() <= 1e-5
    ids = processor(text=LABELS, padding="max_length", max_length=77, return_tensors="pt")["input_ids"]
    ours = clipforge.tokenize(LABELS)
    for row, expected in zip(ids, ours):
        end = int(expected.argmax()) + 1  # through <|endoftext|>; HF pads with it, OpenAI with 0
        assert row[:end].tolist() == expected[:end].tolist()
    assert processor.tokenizer.model_max_length == model.config.text.context_length


def test_zero_shot_pipeline_gives_clipforges_probabilities(exported):
    transformers = pytest.importorskip("transformers")
    model, folder = exported
    classifier = transformers.pipeline("zero-shot-image-classification", model=str(folder), device="cpu")
    image = _shape_image("blue")
    template = "This is a photo of {}."
    answers = classifier(image, candidate_labels=LABELS, hypothesis_template=template)
    scores = {answer["label"]: answer["score"] for answer in answers}
    _, preprocess = clipforge.load(folder)
    with torch.no_grad():
        logits, _ = model(preprocess(image).unsqueeze(0), clipforge.tokenize([template.format(l) for l in LABELS]))
    expected = logits.softmax(dim=-1)[0]
    assert [scores[label] for label in LABELS] == pytest.approx(expected.tolist(), abs=1e-4)


def _fixture(family: str):
    with safe_open(str(FIXTURE), framework="pt") as file:
        config = ClipConfig.from_dict(json.loads(file.metadata()["configs"])[family])
        tensors = {k[len(family) + 1:]: file.get_tensor(k) for k in file.keys() if k.startswith(family + ".")}
    state = {k[len("state."):]: v for k, v in tensors.items() if k.startswith("state.")}
    return config, state, tensors


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_openai_export_is_what_openais_build_model_loaded(tmp_path, family):
    config, state, tensors = _fixture(family)
    model = clipforge.create_model(config).eval()
    model.load_state_dict(state, strict=True)
    exported = torch.load(clipforge.export_openai(model, tmp_path / "w.pt"), weights_only=True)
    assert sorted(exported) == sorted(state), "export_openai's keys changed: regenerate the fixture and check live"
    assert all(torch.equal(exported[k], state[k]) for k in state)
    with torch.no_grad():
        image_features = model.encode_image(tensors["images"])
        text_features = model.encode_text(tensors["tokens"])
    assert (image_features - tensors["openai_image_features"]).abs().max() <= TOLERANCE
    assert (text_features - tensors["openai_text_features"]).abs().max() <= TOLERANCE


def _openai_model_module():
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("OpenAI's code is not installed (pip install --no-deps openai-clip); the fixture test covers it")
    path = Path(spec.submodule_search_locations[0]) / "model.py"
    if not path.is_file():
        pytest.skip(f"no OpenAI model.py in {path.parent}")
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_openai_build_model_loads_the_export_live(tmp_path, family):
    openai = _openai_model_module()
    config, _, _ = _fixture(family)  # head counts that OpenAI's width // 64 rule infers
    torch.manual_seed(5)  # new random weights, not the fixture's
    model = clipforge.create_model(config).eval()
    state = torch.load(clipforge.export_openai(model, tmp_path / "w.pt"), weights_only=True)
    reference = openai.build_model(dict(state)).float().eval()
    reference.load_state_dict(state, strict=True)  # build_model rounds to fp16: back to the exact weights
    images = torch.randn(2, 3, 64, 64)
    tokens = torch.randint(1, 998, (2, 77))
    tokens[:, 6], tokens[:, 7:] = 999, 0  # the end token is the largest id, as OpenAI's code reads
    with torch.no_grad():
        assert (reference.encode_image(images) - model.encode_image(images)).abs().max() <= TOLERANCE
        assert (reference.encode_text(tokens) - model.encode_text(tokens)).abs().max() <= TOLERANCE
