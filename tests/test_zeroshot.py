"""Zero-shot classifier (prompt ensembling), the shipped prompt data, and zero-shot evaluation."""
import json

import pytest
import torch
import torch.nn.functional as F
from _eval_helpers import ColorCLIP, make_color_folder, write_tinted_image

import clipforge
from clipforge.evaluate import (
    classify,
    evaluate_zeroshot,
    fill_template,
    load_classification_data,
    metadata,
    resolve_classnames,
    resolve_templates,
    zero_shot_classifier,
    zero_shot_predict,
)
from clipforge.tokenizer import tokenize


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return clipforge.create_model("tiny-vit").eval()


def test_shipped_prompt_data_has_the_papers_imagenet_and_other_datasets():
    assert len(metadata.templates("imagenet")) == 80
    assert metadata.templates("imagenet")[:2] == ["a bad photo of a {}.", "a photo of many {}."]
    assert len(metadata.classnames("imagenet1k")) == 1000
    assert metadata.classnames("cifar10")[:3] == ["airplane", "automobile", "bird"]
    sizes = {"cifar100": 100, "food101": 101, "pets": 37, "flowers102": 102, "cars": 196,
             "fgvc_aircraft": 100, "dtd": 47, "eurosat": 10, "gtsrb": 43, "mnist": 10, "stl10": 10,
             "sun397": 397, "caltech101": 102, "country211": 211, "resisc45": 45, "ucf101": 101,
             "pcam": 2, "sst2": 2, "birdsnap": 500, "clevr_counts": 8, "fer2013": 7}
    assert {name: len(metadata.classnames(name)) for name in sizes} == sizes
    assert metadata.classnames("fer2013")[3] == ["happy", "smiling"]  # synonyms, as published
    for name in metadata.dataset_names():
        if metadata.has_templates(name):
            assert all("{}" in template for template in metadata.templates(name)), name


def test_fill_template_accepts_openai_and_clip_benchmark_placeholders():
    assert fill_template("a photo of a {}.", "dog") == "a photo of a dog."
    assert fill_template("a photo of a {c}.", "dog") == "a photo of a dog."
    assert fill_template("{}", "a {} in braces") == "a {} in braces"  # the name is not re-filled


def test_resolve_templates_from_none_name_file_string_and_list(tmp_path):
    assert resolve_templates(None) == resolve_templates("none") == ["{}"]
    assert resolve_templates("cifar10") == metadata.templates("cifar10")
    assert resolve_templates("a sketch of a {}.") == ["a sketch of a {}."]
    lines = tmp_path / "templates.txt"
    lines.write_text("# mine\na photo of a {}.\n\nart of the {c}.\n")
    assert resolve_templates(str(lines)) == ["a photo of a {}.", "art of the {c}."]
    listed = tmp_path / "templates.json"
    listed.write_text(json.dumps(["itap of a {}."]))
    assert resolve_templates(str(listed)) == ["itap of a {}."]
    with pytest.raises(ValueError, match="no {} or {c} placeholder"):
        resolve_templates(["a photo."])
    with pytest.raises(ValueError, match="not a file, a known dataset"):
        resolve_templates("no-such-templates")


def test_classifier_is_the_normalised_mean_of_normalised_prompt_embeddings(tiny_model):
    templates = ["a photo of a {}.", "a drawing of the {}.", "{}"]
    classifier = zero_shot_classifier(tiny_model, ["dog", "cat"], templates)
    assert classifier.shape == (tiny_model.config.embed_dim, 2)
    with torch.no_grad():
        for column, name in enumerate(["dog", "cat"]):
            prompts = F.normalize(tiny_model.encode_text(tokenize([t.format(name) for t in templates])), dim=-1)
            expected = F.normalize(prompts.mean(dim=0), dim=0)
            torch.testing.assert_close(classifier[:, column], expected, atol=1e-5, rtol=1e-5)


def test_classifier_class_name_only_single_template_and_synonyms(tiny_model):
    with torch.no_grad():
        bare = F.normalize(tiny_model.encode_text(tokenize(["dog", "cat"])), dim=-1).t()
    torch.testing.assert_close(zero_shot_classifier(tiny_model, ["dog", "cat"], None), bare, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(zero_shot_classifier(tiny_model, ["dog", "cat"], "none"), bare, atol=1e-5, rtol=1e-5)
    single = zero_shot_classifier(tiny_model, ["dog"], "a photo of a {}.")
    with torch.no_grad():
        expected = F.normalize(tiny_model.encode_text(tokenize(["a photo of a dog."])), dim=-1).t()
    torch.testing.assert_close(single, expected, atol=1e-5, rtol=1e-5)
    synonyms = zero_shot_classifier(tiny_model, [["happy", "smiling"]], None)
    expected = F.normalize(F.normalize(tiny_model.encode_text(tokenize(["happy", "smiling"])), dim=-1).mean(0), dim=0)
    torch.testing.assert_close(synonyms[:, 0], expected.detach(), atol=1e-5, rtol=1e-5)


def test_labels_given_twice_or_none_are_refused(tiny_model):
    with pytest.raises(ValueError, match="labels 'dog' and 'Dog' differ only in case"):
        zero_shot_classifier(tiny_model, ["dog", "cat", "Dog"], None)
    with pytest.raises(ValueError, match="no class names"):
        zero_shot_classifier(tiny_model, [], None)


def test_zero_shot_evaluation_scores_known_answers_on_real_images(tmp_path):
    # Folders are the true classes; one red-folder image is green and one blue-folder image is red.
    root = make_color_folder(tmp_path / "data", {"red": ["red", "red", "green"], "green": ["green", "green"],
                                                 "blue": ["blue", "red"]})
    result = evaluate_zeroshot(ColorCLIP(), load_classification_data(root), templates="imagenet", progress=False)
    assert result.classes == ["blue", "green", "red"]
    assert result.metrics["top1"] == pytest.approx(5 / 7)
    assert result.metrics["mean_per_class_recall"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    assert "top5" not in result.metrics  # fewer than 5 classes
    assert result.confusion.tolist() == [[1, 0, 1], [0, 2, 0], [0, 1, 2]]
    report = result.to_report()
    assert [entry["support"] for entry in report["per_class"]] == [2, 2, 3]
    assert report["num_templates"] == 80 and report["skipped"] == []


def test_unreadable_images_are_skipped_counted_and_named(tmp_path):
    root = make_color_folder(tmp_path / "data", {"red": ["red", "red"], "blue": ["blue"]})
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (root / "blue" / "notes.png").write_text("text, not pixels")
    result = evaluate_zeroshot(ColorCLIP(), load_classification_data(root), templates=None, progress=False)
    assert sorted(path.rsplit("/", 1)[1] for path, _ in result.skipped) == ["broken.jpg", "notes.png"]
    assert result.metrics["top1"] == 1.0 and len(result.targets) == 3


def test_classnames_from_dataset_name_mapping_file_and_integer_folders(tmp_path):
    assert resolve_classnames(None, ["golden_retriever", "tabby"]) == ["golden retriever", "tabby"]
    # CIFAR-10 folders named by class match by name; folders named 0..9 match by index.
    cifar = metadata.classnames("cifar10")
    assert resolve_classnames("cifar10", sorted(cifar)) == sorted(cifar)
    assert resolve_classnames("cifar10", [str(i) for i in range(10)]) == cifar
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({"n01": "tench", "n02": ["goldfish", "carassius auratus"]}))
    assert resolve_classnames(str(mapping), ["n01", "n02"]) == ["tench", ["goldfish", "carassius auratus"]]
    with pytest.raises(ValueError, match="no name for class"):
        resolve_classnames(str(mapping), ["n01", "n03"])
    with pytest.raises(ValueError, match="3 class names for 2 classes"):
        resolve_classnames(["a", "b", "c"], ["x", "y"])
    with pytest.raises(ValueError, match="given twice"):
        resolve_classnames(["cat", "cat"], ["x", "y"])


def test_classify_returns_softmax_probabilities_best_first(tmp_path):
    images = [write_tinted_image(tmp_path / "r.png", "red"), write_tinted_image(tmp_path / "b.jpg", "blue", 1)]
    (tmp_path / "bad.jpg").write_text("nope")
    results = classify(ColorCLIP(), [str(p) for p in images] + [str(tmp_path / "bad.jpg")],
                       ["green", "blue", "red"], templates="a photo of a {}.", top_k=2)
    assert [r["predictions"][0]["label"] for r in results[:2]] == ["red", "blue"]
    assert all(len(r["predictions"]) == 2 for r in results[:2])
    assert results[0]["predictions"][0]["score"] > results[0]["predictions"][1]["score"] > 0
    assert "not a readable image" in results[2]["error"] and "predictions" not in results[2]
    full = classify(ColorCLIP(), [str(images[0])], ["green", "blue", "red"], templates=None, top_k=10)
    assert sum(p["score"] for p in full[0]["predictions"]) == pytest.approx(1.0)


def test_zero_shot_predict_on_a_preprocessed_batch(tiny_model):
    classifier = zero_shot_classifier(tiny_model, ["dog", "cat", "bird"], None)
    probs = zero_shot_predict(tiny_model, torch.randn(2, 3, 64, 64), classifier)
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(2))


def test_feature_cache_hits_for_same_weights_and_files_and_misses_after_a_change(tmp_path):
    from clipforge.evaluate import encode_images
    from clipforge.transforms import image_transform

    paths = [str(write_tinted_image(tmp_path / f"{i}.png", "red", i)) for i in range(3)]
    model, preprocess = ColorCLIP(), image_transform(32)
    first = encode_images(model, paths, preprocess, cache_dir=tmp_path / "cache", progress=False)
    second = encode_images(model, paths, preprocess, cache_dir=tmp_path / "cache", progress=False)
    assert model.encoded_images == 3 and torch.equal(first.features, second.features)
    with torch.no_grad():
        model.logit_scale += 1  # new weights: new key
    encode_images(model, paths, preprocess, cache_dir=tmp_path / "cache", progress=False)
    assert model.encoded_images == 6
    write_tinted_image(tmp_path / "1.png", "blue", 1)  # an edited file: new key
    third = encode_images(model, paths, preprocess, cache_dir=tmp_path / "cache", progress=False)
    assert model.encoded_images == 9 and not torch.equal(third.features[1], first.features[1])


def test_bf16_and_fp16_autocast_stay_close_to_fp32(tiny_model, tmp_path):
    root = make_color_folder(tmp_path / "data", {"red": ["red"], "blue": ["blue"]})
    data = load_classification_data(root)
    logits = {precision: evaluate_zeroshot(tiny_model, data, templates=None, precision=precision,
                                           progress=False).logits for precision in ("fp32", "bf16", "fp16")}
    torch.testing.assert_close(logits["bf16"], logits["fp32"], atol=0.2, rtol=0.05)
    torch.testing.assert_close(logits["fp16"], logits["fp32"], atol=0.05, rtol=0.01)
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        evaluate_zeroshot(tiny_model, data, templates=None, precision="int8", progress=False)


def test_per_class_plot_switches_to_a_sorted_curve_for_many_classes(tmp_path):
    from clipforge.evaluate.report import plot_per_class_accuracy

    recalls = [i / 70 for i in range(70)] + [None]  # a class without test images is left out
    path = plot_per_class_accuracy([f"class {i}" for i in range(71)], recalls, tmp_path / "many.png")
    assert path.stat().st_size > 1000
