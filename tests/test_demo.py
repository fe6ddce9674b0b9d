"""``clipforge demo`` end to end on a slice of the real demo data: prepare, train with the real
trainer, evaluate with the real evaluation code, write the reports, resume after an interruption.

The slice (a few dozen images per source, 10 eval classes) and the tiny model keep the module well
under a minute. Where the demo sources are not installed the pipeline tests are skipped, naming the
command that installs them.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import clipforge
import clipforge.demo as demo_package
import clipforge.demo.run as demo
from clipforge.demo import report as demo_report
from clipforge.cli import demo as cli_demo
from clipforge.demo.dataset import DemoDataConfig, prepare_demo_data
from clipforge.demo.sources import DemoSourceError
from clipforge.train import loop
from clipforge.train.resume import list_checkpoints, read_training_state

pytestmark = pytest.mark.slow  # trains, spawns processes or serves: left out of -m 'not slow'

SLICE = DemoDataConfig(max_per_source=30, openclipart_max=30, eval_classes=10, heldout_fraction=0.2)
STEPS, BATCH = 20, 16


@pytest.fixture(scope="module")
def data_dir(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("demo_data") / "data"
    prepare_demo_data(cache_dir, SLICE, data_dir=folder, install=False, progress=False)
    return folder


def _run(run_dir: Path, cache_dir: Path, data_dir: Path) -> demo.DemoResult:
    return demo.run_demo(run_dir, model="tiny-vit", data_dir=data_dir, threads=1, steps=STEPS, batch_size=BATCH,
                         cache_dir=cache_dir, data_config=SLICE, install=False, progress=False)


@pytest.fixture(scope="module")
def finished(cache_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> demo.DemoResult:
    return _run(tmp_path_factory.mktemp("demo_run") / "run", cache_dir, data_dir)


def test_demo_reports_counts_of_the_data_it_used(finished: demo.DemoResult):
    results = finished.results
    train_rows = finished.dataset.train_captions.read_text(encoding="utf-8").splitlines()
    heldout_rows = finished.dataset.heldout_captions.read_text(encoding="utf-8").splitlines()
    assert results["data"]["train_images"] == len(train_rows) > 50
    assert results["retrieval"]["texts"] == len(heldout_rows)
    assert results["retrieval"]["images"] == results["data"]["heldout_images"] > 0
    assert results["zeroshot"]["classes"] == results["zeroshot"]["images"] == 10
    assert results["zeroshot"]["chance"] == pytest.approx(0.1)
    assert results["steps"] == STEPS and results["batch_size"] == BATCH
    for mode in ("bare", "ensemble"):
        assert 0 <= results["zeroshot"][mode]["top1"] <= results["zeroshot"][mode]["top5"] <= 1
    assert results["zeroshot"]["ensemble"]["templates"] == list(demo.ENSEMBLE_TEMPLATES)
    margin = results["zeroshot"]["ensemble_minus_bare"]  # paired over the same images
    assert margin["top1"] == pytest.approx(results["zeroshot"]["ensemble"]["top1"] - results["zeroshot"]["bare"]["top1"],
                                           abs=2e-4)
    assert margin["beyond_noise"] == (margin["top1"] > demo.NOISE_ERRORS * margin["paired_standard_error"])
    for key in ("image_to_text_recall@1", "image_to_text_recall@10", "text_to_image_recall@5"):
        assert 0 <= results["retrieval"][key] <= 1


def test_demo_results_are_what_the_saved_model_scores(finished: demo.DemoResult):
    """results.json agrees with evaluating the saved model again, and training lowered the loss."""
    from clipforge import load
    from clipforge.evaluate import evaluate_retrieval, evaluate_zeroshot, load_image_folder, load_retrieval_data
    from clipforge.train.log import read_metrics

    results, run_dir = finished.results, finished.run_dir
    model, preprocess = load(run_dir / "model")
    from clipforge.demo.records import with_article

    eval_data = load_image_folder(finished.dataset.eval_dir)
    articled = {name: with_article(name) for name in eval_data.classes}
    zeroshot = evaluate_zeroshot(model, eval_data, articled, list(demo.ENSEMBLE_TEMPLATES), preprocess,
                                 cache_dir=None, progress=False)
    assert zeroshot.metrics["top1"] == pytest.approx(results["zeroshot"]["ensemble"]["top1"], abs=1e-4)
    assert zeroshot.metrics["top5"] == pytest.approx(results["zeroshot"]["ensemble"]["top5"], abs=1e-4)
    retrieval = evaluate_retrieval(model, load_retrieval_data(finished.dataset.heldout_captions), preprocess,
                                   cache_dir=None, progress=False)
    for key in ("image_to_text_recall@1", "text_to_image_recall@5"):
        assert retrieval["metrics"][key] == pytest.approx(results["retrieval"][key], abs=1e-4)
    losses = [row["loss"] for row in read_metrics(run_dir / "metrics.jsonl") if "loss" in row]
    assert len(losses) >= 2 and sum(losses[-3:]) / 3 < losses[0]


def test_demo_writes_every_report_file(finished: demo.DemoResult):
    run_dir = finished.run_dir
    on_disk = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    assert on_disk["zeroshot"] == finished.results["zeroshot"]
    for name in on_disk["files"].values():
        assert (run_dir / name).exists(), name
    per_class = json.loads((run_dir / "zeroshot" / "report.json").read_text(encoding="utf-8"))["per_class"]
    assert len(per_class) == 10
    for png in ("curves.png", "predictions.png", "zeroshot/per_class_accuracy.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(on_disk["seconds"]) == {"prepare", "calibrate", "train", "evaluate", "search_index", "total"}


def test_training_loss_fell(finished: demo.DemoResult):
    records = [json.loads(line) for line in (finished.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) >= 4
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # averaged: single batches are noisy
    assert finished.results["final_loss"] < finished.results["first_loss"]


def test_model_folder_loads_with_clipforge_load_and_equals_the_last_checkpoint(finished: demo.DemoResult):
    model, preprocess = clipforge.load(finished.checkpoint)
    last, _ = clipforge.load(list_checkpoints(finished.run_dir)[-1])
    assert model.config.vision.image_size == 64
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, last.state_dict()[name], rtol=0, atol=0)
    image = preprocess(sorted(finished.dataset.eval_dir.glob("*/*.png"))[0])
    assert model.encode_image(image[None]).shape == (1, model.config.embed_dim)


def test_interrupted_training_resumes_and_a_finished_run_is_only_evaluated(
        cache_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    run_dir = tmp_path / "run"
    real_step = loop._optimizer_step

    def step_then_die(run, images, tokens):
        if run.step == 12:  # the checkpoint of step 10 (every STEPS // 4 steps) is on disk
            raise KeyboardInterrupt
        return real_step(run, images, tokens)

    monkeypatch.setattr(loop, "_optimizer_step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        _run(run_dir, cache_dir, data_dir)
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_00000010"]
    monkeypatch.setattr(loop, "_optimizer_step", real_step)
    resumed = _run(run_dir, cache_dir, data_dir)
    assert resumed.results["resumed_from_step"] == 10
    assert [p.name for p in list_checkpoints(run_dir)] == [f"step_{STEPS:08d}"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == STEPS  # no step logged twice
    evaluated = [r["step"] for r in records if "eval/seconds" in r]  # evaluation while training, once per due step
    assert evaluated == sorted(set(evaluated)) and evaluated[-1] == STEPS and len(evaluated) >= 4
    again = _run(run_dir, cache_dir, data_dir)
    assert again.results["resumed_from_step"] == STEPS
    assert again.results["zeroshot"] == resumed.results["zeroshot"]


def test_a_timed_run_trains_to_its_budget_and_is_then_only_evaluated(cache_dir: Path, data_dir: Path, tmp_path: Path):
    """Without ``steps`` the demo measures its speed, plans, and hands the trainer the minutes left,
    which re-plans from the speed it sees; a second call finds the run finished."""
    run_dir = tmp_path / "timed"
    timed = demo.run_demo(run_dir, minutes=0.3, model="tiny-vit", data_dir=data_dir, threads=1, batch_size=BATCH,
                          cache_dir=cache_dir, data_config=SLICE, install=False, progress=False)
    results = timed.results
    saved = json.loads((run_dir / "train_config.json").read_text())
    assert 0 < saved["minutes"] < 0.3 and saved["steps"] == results["planned_steps"] >= 1
    final = list_checkpoints(run_dir)[-1]
    assert final.name == f"step_{results['steps']:08d}"
    state = read_training_state(final)
    assert state["step"] == state["total_steps"] == results["steps"]
    assert results["epochs"] == pytest.approx(results["steps"] * BATCH / results["data"]["train_images"], abs=0.01)
    again = demo.run_demo(run_dir, minutes=0.3, model="tiny-vit", data_dir=data_dir, threads=1, batch_size=BATCH,
                          cache_dir=cache_dir, data_config=SLICE, install=False, progress=False)
    assert again.results["resumed_from_step"] == again.results["steps"] == results["steps"]
    assert [p.name for p in list_checkpoints(run_dir)] == [final.name]


def test_resuming_with_another_model_names_the_run_folder(finished: demo.DemoResult, cache_dir: Path, data_dir: Path):
    with pytest.raises(ValueError, match="holds a run of model 'tiny-vit'"):
        demo.run_demo(finished.run_dir, model="tiny-rn", data_dir=data_dir, threads=1, steps=STEPS, batch_size=BATCH,
                      cache_dir=cache_dir, data_config=SLICE, install=False, progress=False)


def test_format_results_prints_the_table(finished: demo.DemoResult):
    table = demo_report.format_results(finished.results)
    assert "zero-shot on Fluent 3D emoji (10 classes" in table
    assert "prompt ensemble" in table and "text -> image" in table


def test_cli_turns_a_missing_source_into_a_one_line_error_with_exit_2(monkeypatch: pytest.MonkeyPatch, capsys,
                                                                    tmp_path):
    import clipforge.cli as cli

    def missing(*args, **kwargs):
        raise DemoSourceError("the demo needs the npm packages ['emojibase-data'] but npm is not on PATH; "
                              "install Node.js, then run: npm install --prefix x emojibase-data@17.0.0")

    monkeypatch.setattr(demo_package, "run_demo", missing)
    monkeypatch.setattr(cli, "COMMANDS", ["demo"])  # this command alone, whatever else is registered
    assert cli.main(["demo", "--quick", "--run-dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("clipforge demo: error: ") and "npm install" in error


def test_cli_defaults_match_the_library(monkeypatch: pytest.MonkeyPatch):
    import clipforge.cli as cli

    monkeypatch.setattr(cli, "COMMANDS", ["demo"])
    args = cli.build_parser().parse_args(["demo"])
    assert (args.minutes, args.model, args.threads, args.run_dir) == (demo.DEFAULT_MINUTES, demo.DEFAULT_MODEL, "auto",
                                                                      "runs/demo")
    assert cli.build_parser().parse_args(["demo", "--threads", "2"]).threads == 2


def test_pick_threads_takes_one_thread_when_other_programs_keep_the_cpu_busy(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(demo, "_load_average", lambda: 2 * demo.BUSY_LOAD)
    assert demo.pick_threads("tiny-vit", 8) == 1


def test_pick_threads_leaves_a_core_to_each_loader_worker(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(demo, "_load_average", lambda: 0.0)
    measured = []
    monkeypatch.setattr(demo.time, "perf_counter", lambda: measured.append(1) or float(len(measured)))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert demo.pick_threads("tiny-vit", 8, workers=1) == 1 and not measured  # nothing left to compare
        torch.set_num_threads(4)
        assert demo.pick_threads("tiny-vit", 8, workers=1) in (3, 1) and measured  # 3 against 1, measured
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("faster", [1, 2])
def test_pick_threads_picks_the_measured_faster_count_and_restores_the_setting(monkeypatch: pytest.MonkeyPatch,
                                                                               faster: int):
    """A fake clock makes ``faster`` threads take 1 s a pass and the other count 3 s."""
    now = [0.0]

    def clock():
        now[0] += 0.5 if torch.get_num_threads() == faster else 1.5  # two reads a pass
        return now[0]

    monkeypatch.setattr(demo.time, "perf_counter", clock)
    before = torch.get_num_threads()
    assert demo.pick_threads("tiny-vit", 8, candidates=(2, 1)) == faster
    assert torch.get_num_threads() == before


def test_demo_collections_are_embedded_indexed_and_searchable(finished: demo.DemoResult):
    """The demo's last step: its held-out and Fluent images in collections that clipforge serve answers."""
    import base64

    pytest.importorskip("faiss")
    httpx = pytest.importorskip("httpx")
    from clipforge.search._batcher import QueryEncoder
    from clipforge.search._guard import LOOPBACK_HOSTS
    from clipforge.search.collection import load_collections
    from clipforge.search.service import create_app

    from _search_fixtures import LiveServer

    search = finished.results["search"]
    assert search["serve"].startswith("clipforge serve ") and len(search["collections"]) == 2
    heldout = json.loads((Path(search["collections"][0]) / "manifest.json").read_text())
    assert heldout["count"] == finished.results["retrieval"]["texts"] and not heldout["skipped"]  # a row per pair
    model, preprocess = clipforge.load(finished.checkpoint)
    server = LiveServer(create_app(load_collections(search["collections"]), QueryEncoder(model, "cpu", "fp32"),
                                   preprocess, allowed_hosts=LOOPBACK_HOSTS))
    try:
        image = sorted(finished.dataset.eval_dir.glob("*/*.png"))[3]
        body = {"image": base64.b64encode(image.read_bytes()).decode(), "modality": "image",
                "indice_name": "fluent3d", "num_images": 5}
        results = httpx.post(f"{server.url}/knn-service", json=body, timeout=60).json()
        found = {Path(r["image_path"]): r["similarity"] for r in results}  # a briefly trained model may tie images
        assert found.get(image, 0) > 0.999 and found[image] >= results[0]["similarity"] - 2e-3  # float16 rows
        texts = httpx.get(f"{server.url}/search", params={"q": "a cat", "k": 5, "collection": "heldout"}, timeout=60)
        assert texts.status_code == 200
    finally:
        server.stop()


def test_the_margin_is_read_against_the_noise_in_both_directions():
    from clipforge.demo.report import _margin_reading

    error = 0.024
    assert _margin_reading({"top1": 0.06, "paired_standard_error": error, "beyond_noise": True}) == "ahead beyond"
    assert _margin_reading({"top1": -0.05, "paired_standard_error": error, "beyond_noise": False}) == "behind beyond"
    assert _margin_reading({"top1": -0.03, "paired_standard_error": error, "beyond_noise": False}) == "within"
