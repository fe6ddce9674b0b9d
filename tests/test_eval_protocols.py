"""Dataset protocols: each standard layout built from real images, its labels, counts and scoring."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import clipforge
from clipforge.cli import main
from clipforge.evaluate import evaluate_zeroshot, load_classification_data, load_image_folder
from clipforge.evaluate.protocols import evaluate_protocol, label_logits
from clipforge.evaluate.protocols.objectnet import BorderCrop

from _protocol_layouts import copy_image, demo_images, make_class_folders, make_objectnet, make_wds, wnid_table

ONE_TEMPLATE = ["a photo of a {}."]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One feature cache for the module: the 1,000 prompts are embedded once, not in every test."""
    return dict(progress=False, cache_dir=tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return clipforge.create_model("tiny-vit").eval()


@pytest.fixture(scope="module")
def imagenet_folders(tmp_path_factory):
    """1,000 wnid folders in a shuffled creation order, two images in the first and last."""
    root = tmp_path_factory.mktemp("imagenet") / "val"
    wnids = wnid_table("imagenet")
    order = np.random.default_rng(0).permutation(len(wnids))
    make_class_folders(root, [wnids[i] for i in order])
    copy_image(demo_images()[-1], root / wnids[0] / "extra.png")
    copy_image(demo_images()[-2], root / wnids[999] / "extra.png")
    return root


def test_imagenet_label_is_position_of_wnid_in_sorted_order(imagenet_folders):
    data = load_classification_data(imagenet_folders, dataset="imagenet")
    wnids = wnid_table("imagenet")
    assert len(data.classes) == 1000 and len(data.paths) == 1002
    assert data.classes[0] == "tench" and data.classes[999] == "toilet paper"
    for path, label in zip(data.paths, data.labels):
        assert path.split("/")[-2] == wnids[label]
    assert np.bincount(data.labels).tolist() == [2] + [1] * 998 + [2]


def test_imagenet_sketch_reads_the_same_wnid_layout(imagenet_folders):
    data = load_classification_data(imagenet_folders, dataset="imagenet-sketch")
    assert data.dataset == "imagenet-sketch" and len(data.classes) == 1000 and data.label_hits[5] == [5]


def test_missing_and_unknown_wnids_stop_with_one_line(imagenet_folders, tmp_path, capsys):
    broken = tmp_path / "val"
    shutil.copytree(imagenet_folders, broken)
    shutil.rmtree(broken / "n01440764")
    (broken / "n99999999").mkdir()
    with pytest.raises(ValueError) as error:
        load_classification_data(broken, dataset="imagenet")
    message = str(error.value)
    assert "\n" not in message and "expects 1000 class folders" in message
    assert "1 missing: 'n01440764'" in message and "1 unknown: 'n99999999'" in message
    assert main(["eval", "zeroshot", "--dataset", "imagenet", "--data", str(broken), "--model", "tiny-vit"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_imagenet_r_with_1000_folders_is_a_wrong_class_count(imagenet_folders):
    with pytest.raises(ValueError, match=r"imagenet-r expects 200 class folders named by wnid, found 1000"):
        load_classification_data(imagenet_folders, dataset="imagenet-r")


def _flat_folder(root, count=12):
    images = demo_images()
    for number in range(1, count + 1):
        copy_image(images[number * 5], root / f"ILSVRC2012_val_{number:08d}.JPEG", jpeg=True)
    return [(number * 83) % 1000 for number in range(1, count + 1)]  # the class index of each image


def test_flat_imagenet_with_devkit_ids_and_meta_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    classes = _flat_folder(tmp_path / "val")
    wnids = wnid_table("imagenet")
    # The devkit numbers classes by ILSVRC2012 id, which is not the sorted-wnid order: permute.
    id_of_class = [(c * 7 + 3) % 1000 + 1 for c in range(1000)]
    devkit = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    devkit.mkdir(parents=True)
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("\n".join(str(id_of_class[c]) for c in classes))
    synsets = np.zeros(1001, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")])
    for c in range(1000):
        synsets[c] = (id_of_class[c], wnids[c], f"words {c}", 0)
    synsets[1000] = (1001, "n00001740", "entity", 3)  # an inner node, as in the real meta.mat
    scipy_io.savemat(devkit / "meta.mat", {"synsets": synsets.reshape(-1, 1)})
    data = load_classification_data(tmp_path / "val", dataset="imagenet")
    assert data.labels == classes and len(data.classes) == 1000
    assert "ILSVRC2012_validation_ground_truth.txt + " in data.notes[0]


def test_flat_imagenet_with_wnid_lines_or_kaggle_csv(tmp_path):
    wnids = wnid_table("imagenet")
    classes = _flat_folder(tmp_path / "a" / "val")
    (tmp_path / "a" / "val" / "ILSVRC2012_validation_ground_truth.txt").write_text(
        "\n".join(wnids[c] for c in classes) + "\n")
    assert load_classification_data(tmp_path / "a" / "val", dataset="imagenet").labels == classes
    classes = _flat_folder(tmp_path / "b" / "val")
    rows = [f"ILSVRC2012_val_{n:08d},{wnids[c]} 1 2 3 4" for n, c in enumerate(classes, 1)]
    (tmp_path / "b" / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows[::-1]) + "\n")
    assert load_classification_data(tmp_path / "b" / "val", dataset="imagenet").labels == classes


def test_flat_imagenet_without_ground_truth_names_the_files_it_needs(tmp_path):
    _flat_folder(tmp_path / "val", count=3)
    with pytest.raises(ValueError, match=r"without ground truth; expected ILSVRC2012_validation_ground_truth.txt "
                                         r"\(\+ meta.mat\) or LOC_val_solution.csv"):
        load_classification_data(tmp_path / "val", dataset="imagenet")


def test_imagenet_v2_folder_number_is_the_class_not_its_string_rank(tmp_path):
    root = tmp_path / "imagenetv2-matched-frequency"
    make_class_folders(root, [str(i) for i in range(1000)])
    data = load_classification_data(root, dataset="imagenet-v2")
    assert all(int(path.split("/")[-2]) == label for path, label in zip(data.paths, data.labels))
    assert data.classes[10] == "brambling" and data.label_hits[10] == [10]
    # The plain image-folder reader sorts names as strings: all but 0, 1 and 990-999 would be mislabelled.
    as_strings = load_image_folder(root)
    wrong = sum(int(path.split("/")[-2]) != label for path, label in zip(as_strings.paths, as_strings.labels))
    assert wrong == 988
    (root / "1000").mkdir()
    with pytest.raises(ValueError, match=r"imagenet-v2 expects 1000 class folders named 0 ... 999, found 1001 "
                                         r"\(1 unknown: '1000'\)"):
        load_classification_data(root, dataset="imagenet-v2")


@pytest.fixture(scope="module")
def imagenet_r(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet-r") / "imagenet-r"
    make_class_folders(root, wnid_table("imagenet_r"), offset=1000)
    return root


@pytest.mark.slow
def test_imagenet_r_masking_equals_zero_shot_over_the_200_names_alone(imagenet_r, tiny_model, cache):
    data = load_classification_data(imagenet_r, dataset="imagenet-r")
    assert len(data.classes) == 200 and data.classes[0] == "goldfish"
    masked = evaluate_protocol(tiny_model, data, templates=ONE_TEMPLATE, **cache)
    alone = evaluate_zeroshot(tiny_model, load_image_folder(imagenet_r), classnames=data.classes,
                              templates=ONE_TEMPLATE, progress=False)  # no cache: its own prompt batches
    assert masked.metrics == alone.metrics
    assert torch.equal(masked.logits.argmax(-1), alone.logits.argmax(-1))
    torch.testing.assert_close(masked.logits, alone.logits, atol=1e-4, rtol=0)
    # 1000-way: the same images with the other 800 classes competing can only lose hits.
    full = evaluate_protocol(tiny_model, data, "1000way", templates=ONE_TEMPLATE, **cache)
    hits = [data.label_hits[t][0] for t in full.targets.tolist()]
    assert full.metrics["top1"] == float((full.logits.argmax(-1) == torch.tensor(hits)).float().mean())
    assert full.metrics["top1"] <= masked.metrics["top1"] and full.scoring == "1000way"


def test_imagenet_a_and_o_read_their_own_200_classes(tmp_path):
    for dataset, table in (("imagenet-a", "imagenet_a"), ("imagenet-o", "imagenet_o")):
        make_class_folders(tmp_path / dataset, wnid_table(table))
        data = load_classification_data(tmp_path / dataset, dataset=dataset)
        all_wnids = wnid_table("imagenet")
        assert data.wnids == wnid_table(table) and len(set(data.wnids)) == 200
        assert [hits[0] for hits in data.label_hits] == [all_wnids.index(w) for w in data.wnids]
    assert set(wnid_table("imagenet_a")) != set(wnid_table("imagenet_o"))


def test_cli_reports_the_protocol_and_scoring_used(imagenet_r, tmp_path, capsys, cache):
    args = ["eval", "zeroshot", "--dataset", "imagenet-r", "--data", str(imagenet_r), "--model", "tiny-vit",
            "--templates", "a photo of a {}.", "--cache-dir", str(cache["cache_dir"]), "--workers", "0", "--out", str(tmp_path / "out")]
    assert main(args + ["--protocol", "1000way"]) == 0
    out = capsys.readouterr().out
    assert "protocol imagenet-r, scored 1000way with every ImageNet class competing" in out
    import json

    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["dataset"] == "imagenet-r" and report["scoring"] == "1000way" and report["num_classes"] == 200


@pytest.fixture(scope="module")
def objectnet(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectnet")
    return root, make_objectnet(root)


def test_objectnet_maps_113_of_313_folders_through_the_release_mappings(objectnet):
    root, mapped = objectnet
    data = load_classification_data(root, dataset="objectnet")
    assert len(data.classes) == 113 and len(data.paths) == 113
    assert data.wnids == sorted(mapped) and data.label_hits == [mapped[f] for f in sorted(mapped)]
    assert data.label_hits[0] == [11, 500] and data.classes[0] == "thing 000"
    assert all(p.split("/")[-2] in mapped for p in data.paths)


def test_objectnet_hit_is_any_imagenet_class_mapped_to_the_label():
    logits = torch.full((3, 1000), -5.0)
    logits[0, 500] = 3.0  # second class of label 0: a hit for label 0
    logits[1, 11] = 2.0
    logits[1, 48] = 2.5  # label 1's class beats label 0's
    logits[2, 999] = 9.0  # a class outside every label: ignored under subset scoring
    logits[2, 11] = 1.0
    projected = label_logits(logits, [[11, 500], [48]])
    assert projected.tolist() == [[3.0, -5.0], [2.0, 2.5], [1.0, -5.0]]


def test_objectnet_scores_equal_a_recount_from_the_1000_way_logits(objectnet, tiny_model, cache):
    root, mapped = objectnet
    data = load_classification_data(root, dataset="objectnet")
    result = evaluate_protocol(tiny_model, data, templates=ONE_TEMPLATE, **cache)
    full = evaluate_protocol(tiny_model, data, "1000way", templates=ONE_TEMPLATE, **cache)
    union = sorted({c for hits in data.label_hits for c in hits})
    masked = torch.full_like(full.logits, float("-inf"))
    masked[:, union] = full.logits[:, union]
    top = masked.argmax(-1).tolist()
    expected = np.mean([top[i] in data.label_hits[t] for i, t in enumerate(full.targets.tolist())])
    assert result.metrics["top1"] == pytest.approx(expected, abs=1e-9)
    top_all = full.logits.argmax(-1).tolist()
    expected_all = np.mean([top_all[i] in data.label_hits[t] for i, t in enumerate(full.targets.tolist())])
    assert full.metrics["top1"] == pytest.approx(expected_all, abs=1e-9)


def test_objectnet_images_lose_a_two_pixel_border(tmp_path):
    from PIL import Image

    image = Image.new("RGB", (20, 16), (255, 0, 0))
    image.paste(Image.new("RGB", (16, 12), (0, 0, 255)), (2, 2))
    image.save(tmp_path / "bordered.png")
    cropped = BorderCrop(lambda im: np.asarray(im))(str(tmp_path / "bordered.png"))
    assert cropped.shape == (12, 16, 3) and (cropped == [0, 0, 255]).all()
    assert "BorderCrop(2" in repr(BorderCrop(lambda im: im))


def test_objectnet_wrong_folder_count_or_missing_mappings_stop(objectnet, tmp_path):
    root, _ = objectnet
    copy = tmp_path / "objectnet"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "objectnet-1.0" / "images" / "object_312")
    with pytest.raises(ValueError, match=r"ObjectNet 1.0 has 313 object folders, found 312"):
        load_classification_data(copy, dataset="objectnet")
    (copy / "objectnet-1.0" / "mappings" / "objectnet_to_imagenet_1k.json").unlink()
    with pytest.raises(ValueError, match=r"needs the release's mappings"):
        load_classification_data(copy, dataset="objectnet")


def test_clip_benchmark_webdataset_folder_is_read_in_place(tmp_path, tiny_model):
    names = ["grinning face", "red heart", "rocket", "cat face", "pizza", "umbrella"]
    samples = make_wds(tmp_path / "wds_demo", names, templates=["a drawing of a {c}.", "an emoji of a {c}."])
    data = load_classification_data(tmp_path / "wds_demo", dataset="wds")
    assert data.labels == [label for _, label in samples] and data.classes == names
    assert data.templates == ["a drawing of a {c}.", "an emoji of a {c}."] and data.dataset == "wds/wds_demo"
    result = evaluate_protocol(tiny_model, data, progress=False)
    folder = tmp_path / "as_folder"
    for k, (source, label) in enumerate(samples):
        copy_image(source, folder / f"{label:02d}" / f"{k}.png")
    as_folder = load_image_folder(folder)
    reference = evaluate_zeroshot(tiny_model, as_folder, classnames=names, templates=data.templates, progress=False)
    assert result.metrics == reference.metrics and not result.skipped
    sample_of_row = [int(path.split("/")[-1].split(".")[0]) for path in as_folder.paths]
    torch.testing.assert_close(result.logits[sample_of_row], reference.logits, atol=1e-4, rtol=0)
