"""The audit of ``clipforge demo``: a Ctrl-C before the first checkpoint, a run folder holding
another run, where ``--quick`` writes, atomic results, the early one-line checks (``--minutes``,
``--steps``, ``--run-dir``, ``--model``, ``--port``), honest summary wording, leftovers of a killed
dataset build, and ``--prepare-only --quick``.

The tests that train use a slice of the real demo data and ``tiny-vit`` for a few steps; the CLI
checks replace the demo with a stub that fails the test if it is reached.
"""
from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

import clipforge.cli.serve as cli_serve
import clipforge.demo as demo_package
import clipforge.demo.dataset as demo_dataset
import clipforge.demo.run as demo
from clipforge import files
from clipforge.demo.dataset import DemoDataConfig, prepare_demo_data
from clipforge.demo.report import format_results
from clipforge.demo.sources import DemoSourceError
from clipforge.train import loop
from clipforge.train.resume import list_checkpoints

from _cli_errors import run_cli

slow = pytest.mark.slow  # trains: left out of -m 'not slow'

SLICE = DemoDataConfig(max_per_source=30, openclipart_max=30, eval_classes=10, heldout_fraction=0.2)
STEPS, BATCH = 8, 16  # checkpoints every 2 steps


@pytest.fixture(scope="module")
def data_dir(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("audit_data") / "data"
    prepare_demo_data(cache_dir, SLICE, data_dir=folder, install=False, progress=False)
    return folder


def _run(run_dir: Path, cache_dir: Path, data_dir: Path, **changes) -> demo.DemoResult:
    settings = dict(model="tiny-vit", data_dir=data_dir, threads=1, steps=STEPS, batch_size=BATCH,
                    cache_dir=cache_dir, data_config=SLICE, install=False, progress=False)
    return demo.run_demo(run_dir, **{**settings, **changes})


@pytest.fixture(scope="module")
def restarted(cache_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A run stopped by Ctrl-C after its first step (its first checkpoint comes at step 2), then the
    same call again: ``(run_dir, what the stop left, the second call's result)``."""
    run_dir = tmp_path_factory.mktemp("audit_run") / "run"
    real_step = loop._optimizer_step

    def step_then_interrupt(run, images, tokens):
        if run.step == 1:
            raise KeyboardInterrupt
        return real_step(run, images, tokens)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loop, "_optimizer_step", step_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            _run(run_dir, cache_dir, data_dir)
    left = {"checkpoints": list_checkpoints(run_dir), "metrics": (run_dir / "metrics.jsonl").read_text()}
    return run_dir, left, _run(run_dir, cache_dir, data_dir)


@pytest.fixture(scope="module")
def again(restarted, cache_dir: Path, data_dir: Path):
    """The same call once more on the finished run, recording every file renamed into place."""
    run_dir = restarted[0]
    replaced, real_replace = [], os.replace

    def recording_replace(source, target, *args, **kwargs):
        replaced.append(Path(target))
        return real_replace(source, target, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(files.os, "replace", recording_replace)
        result = _run(run_dir, cache_dir, data_dir)
    return result, replaced


@pytest.fixture
def no_preparation(monkeypatch: pytest.MonkeyPatch) -> list:
    """Data preparation, recorded and refused: a test that reaches it asserts the list is empty."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append((args, kwargs))
        raise AssertionError("the demo started although its arguments are bad")

    monkeypatch.setattr(demo, "prepare_demo_data", refuse)
    monkeypatch.setattr(demo_dataset, "prepare_demo_data", refuse)
    return calls


@pytest.fixture
def no_demo(no_preparation: list, monkeypatch: pytest.MonkeyPatch) -> list:
    """``run_demo`` itself too, for the checks the CLI makes before calling it."""
    def refuse(*args, **kwargs):
        no_preparation.append((args, kwargs))
        raise AssertionError("the demo started although its arguments are bad")

    monkeypatch.setattr(demo_package, "run_demo", refuse)
    return no_preparation


def _error_line(err: str) -> str:
    """The one ``clipforge demo: error:`` line of ``err``; fails on a traceback or more lines."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("clipforge demo: error: "), err
    return lines[0]


# ------------------------------------------------------------------------ 1. Ctrl-C, 2. another run
@slow
def test_ctrl_c_before_the_first_checkpoint_then_the_same_command_trains_from_the_start(restarted):
    run_dir, left, result = restarted
    assert left["checkpoints"] == [] and left["metrics"].strip()  # a half-started run was there
    assert result.results["steps"] == STEPS and result.results["resumed_from_step"] is None
    assert [p.name for p in list_checkpoints(run_dir)] == [f"step_{STEPS:08d}"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, STEPS + 1))  # the stopped run's step 1 is not mixed in


@slow
@pytest.mark.parametrize("changes, differs", [
    ({"batch_size": 8}, "batch size 16 (this call: batch size 8)"),
    ({"steps": 12}, "8 steps (this call: 12 steps)"),
    ({"steps": None, "minutes": 0.5}, "8 steps (this call: a budget of 0.5 minutes)"),
    ({"model": "tiny-rn"}, "model 'tiny-vit' (this call: model 'tiny-rn')"),
    ({"data_dir": "elsewhere"}, "data from "),
])
def test_a_folder_holding_another_run_is_refused_before_any_work(restarted, cache_dir: Path, data_dir: Path,
                                                                 no_preparation, changes: dict, differs: str):
    run_dir, changes = restarted[0], dict(changes)
    if "data_dir" in changes:
        data_dir = run_dir.parent / changes.pop("data_dir")
    with pytest.raises(ValueError) as refused:
        _run(run_dir, cache_dir, data_dir, **changes)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{run_dir} holds a run of ")
    assert differs in message and "use another --run-dir" in message
    assert not no_preparation


@slow
def test_the_cli_refuses_another_runs_folder_in_one_line(restarted, no_preparation, capsys):
    run_dir = restarted[0]  # tiny-vit, 8 steps of 16 on a slice; this call: demo-rn's budget run
    status, _, err = run_cli(capsys, "demo", "--run-dir", run_dir, "--threads", "1")
    line = _error_line(err)
    assert status == 2 and "model 'tiny-vit' (this call: model 'demo-rn')" in line
    assert "batch size 16 (this call: batch size 64)" in line and "8 steps (this call: a budget of 8 minutes)" in line
    assert not no_preparation


@slow
def test_the_same_command_again_only_evaluates_and_says_so(restarted, again):
    result, _ = again
    assert result.results["trained_by_earlier_call"] is True
    assert result.results["resumed_from_step"] == STEPS
    assert result.results["zeroshot"] == restarted[2].results["zeroshot"]
    assert "training done by an earlier call" in format_results(result.results)



@slow
def test_a_finished_run_is_evaluated_without_timing_thread_counts(restarted, again, cache_dir: Path, data_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    def no_timing(*args, **kwargs):
        raise AssertionError("pick_threads timed training steps of a run that has nothing left to train")

    monkeypatch.setattr(demo, "pick_threads", no_timing)
    result = _run(restarted[0], cache_dir, data_dir, threads="auto")
    assert result.results["trained_by_earlier_call"] is True and result.results["steps"] == STEPS
    assert result.results["threads"] == demo.torch.get_num_threads()  # torch's own setting evaluated
    assert result.results["zeroshot"] == again[0].results["zeroshot"]

# ---------------------------------------------------------------------------------- 3. --quick
def test_quick_defaults_its_run_folder_to_runs_demo_quick(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys):
    monkeypatch.chdir(tmp_path)
    asked = []

    def record(run_dir, **kwargs):
        asked.append(str(run_dir))
        raise DemoSourceError("stopped by the test")

    monkeypatch.setattr(demo_package, "run_demo", record)
    for argv in (["--quick"], [], ["--quick", "--run-dir", "mine"], ["--run-dir", "runs/demo", "--quick"]):
        assert run_cli(capsys, "demo", *argv)[0] == 2
    assert asked == ["runs/demo-quick", "runs/demo", "mine", "runs/demo"]
    assert not (tmp_path / "runs").exists()  # the checks made nothing


def test_run_demo_quick_defaults_to_runs_demo_quick(monkeypatch: pytest.MonkeyPatch, no_preparation):
    checked = []
    monkeypatch.setattr(demo, "check_run_folder", lambda run_dir, identity: checked.append(run_dir))
    with pytest.raises(AssertionError):
        demo.run_demo(quick=True, install=False, progress=False)
    assert checked == [Path("runs/demo-quick")]


# ---------------------------------------------------------------------------- 4. atomic results
@slow
def test_results_files_are_renamed_into_place_with_normal_permissions(again):
    result, replaced = again
    run_dir = result.run_dir
    names = {path.relative_to(run_dir).as_posix() for path in replaced if run_dir in path.parents}
    assert {"results.json", "retrieval.json", "zeroshot/report.json", "zeroshot_bare/report.json"} <= names
    umask = os.umask(0o022)
    os.umask(umask)
    assert (run_dir / "results.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert not [p for p in run_dir.rglob("*") if ".tmp-" in p.name]
    assert json.loads((run_dir / "results.json").read_text())["steps"] == STEPS


# ------------------------------------------------------------------------------ 5. early checks
@pytest.mark.parametrize("argv, expected", [
    (["--minutes", "inf"], "--minutes inf"), (["--minutes", "0"], "--minutes 0"),
    (["--minutes", "-2"], "--minutes -2"), (["--minutes", "nan"], "--minutes nan"),
    (["--steps", "0"], "--steps 0"), (["--steps", "-3"], "--steps -3"),
    (["--model", "ViT-Q/99"], "the demo presets are demo-rn (the default), demo-vit;"),
    (["--run-dir", "{file}"], "is a file"), (["--run-dir", "{file}/run"], "cannot be made"),
    (["--data-dir", "{file}"], "is a file"), (["--data-dir", "{file}", "--prepare-only"], "is a file"),
])
def test_bad_arguments_are_one_line_errors_before_any_work(no_demo, tmp_path: Path, capsys, argv, expected):
    (tmp_path / "taken").write_text("a file, not a folder")
    argv = [arg.replace("{file}", str(tmp_path / "taken")) for arg in argv]
    run_dir = [] if "--run-dir" in argv else ["--run-dir", str(tmp_path / "run")]
    status, _, err = run_cli(capsys, "demo", *run_dir, *argv)
    line = _error_line(err)
    assert status == 2 and not no_demo
    assert expected in line and argv[0] in line


def test_an_unwritable_run_folder_is_refused_before_any_work(no_demo, capsys):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs /proc, a folder nobody (root included) can create files in")
    status, _, err = run_cli(capsys, "demo", "--run-dir", "/proc/clipforge-demo-run")
    assert status == 2 and not no_demo
    assert "--run-dir /proc/clipforge-demo-run: cannot write in /proc" in _error_line(err)


def test_run_demo_refuses_infinite_minutes_before_preparing_data(no_preparation):
    for minutes in (float("inf"), float("nan"), 0.0):
        with pytest.raises(ValueError, match="minutes must be a finite number above 0"):
            demo.run_demo("unused", minutes=minutes, install=False, progress=False)
    assert not no_preparation


# ------------------------------------------------------------------------------- 6. --serve --port
def test_serve_port_in_use_is_refused_before_the_demo_trains(no_demo, tmp_path: Path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, _, err = run_cli(capsys, "demo", "--serve", "--port", port, "--run-dir", tmp_path / "run")
    line = _error_line(err)
    assert status == 2 and f"--port {port}" in line and "in use" in line and not no_demo


def test_serve_gets_the_port_it_was_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    search = {"collections": [str(tmp_path / "search" / "heldout")], "serve": "clipforge serve ..."}
    finished = demo.DemoResult(tmp_path / "run", tmp_path / "run" / "model", {"search": search}, dataset=None)
    served = []
    monkeypatch.setattr(demo_package, "run_demo", lambda *args, **kwargs: finished)
    monkeypatch.setattr(demo_package, "format_results", lambda results: "the table")
    monkeypatch.setattr(cli_serve, "run", lambda args: served.append((args.port, args.host)) or 0)
    status, out, _ = run_cli(capsys, "demo", "--serve", "--port", port, "--run-dir", tmp_path / "run")
    assert status == 0 and served == [(port, "127.0.0.1")] and "the table" in out


# -------------------------------------------------------------------------------- 7. the summary
def _results_with(base: dict, **changes) -> dict:
    results = json.loads(json.dumps(base))
    for key, value in changes.items():
        if key == "margin":
            results["zeroshot"]["ensemble_minus_bare"] = value
        else:
            results[key] = value
    return results


@slow
def test_the_summary_reads_the_margin_against_its_noise(restarted):
    base = restarted[2].results
    within = _results_with(base, margin={"top1": 0.02, "paired_standard_error": 0.03, "beyond_noise": False})
    within["floor"]["ensemble_beats_bare"] = True
    table = format_results(within)
    assert "ensemble top-1 above bare names' (within the noise)" in table and "beats" not in table
    behind = format_results(_results_with(base, margin={"top1": -0.1, "paired_standard_error": 0.02,
                                                        "beyond_noise": False}))
    assert "ensemble top-1 below bare names' (beyond the noise)" in behind
    ahead = format_results(_results_with(base, margin={"top1": 0.1, "paired_standard_error": 0.02,
                                                       "beyond_noise": True}))
    assert "ensemble top-1 above bare names' (beyond the noise)" in ahead


@slow
def test_the_summary_and_results_say_how_training_went_in_this_call(restarted):
    results = restarted[2].results
    assert results["training_budget_s"] is None  # a fixed step count
    assert 0 < results["training_budget_spent_s"] <= results["seconds"]["total"]
    assert results["trained_by_earlier_call"] is False
    fresh = format_results(results)
    assert f"training {results['training_budget_spent_s']:.0f} s" in fresh and "resumed" not in fresh
    resumed = format_results(_results_with(results, resumed_from_step=4, training_budget_s=480.0))
    assert "of its 480 s budget, resumed at step 4" in resumed


# ---------------------------------------------------------------------- 8. a killed dataset build
@slow
def test_leftovers_of_a_killed_build_are_rendered_again_not_counted(cache_dir: Path, data_dir: Path, tmp_path: Path):
    done = demo_dataset.load_demo_dataset(data_dir)
    noto = next(json.loads(line)["image"] for line in done.train_captions.read_text().splitlines()
                if "/noto/" in line)
    folder = tmp_path / "data"
    (folder / "images" / "noto").mkdir(parents=True)
    (folder / "images" / "noto" / "1f600.tmp.png").write_bytes(b"")  # killed while writing
    (folder / noto).write_bytes(b"")  # renamed into place, then lost in a crash
    rebuilt = prepare_demo_data(cache_dir, SLICE, data_dir=folder, install=False, progress=False)
    assert not list(folder.rglob("*.tmp.png"))
    assert rebuilt.counts == done.counts
    assert (folder / noto).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------ 9. --prepare-only --quick
@pytest.mark.parametrize("quick", [True, False])
def test_prepare_only_prepares_what_the_demo_then_trains_on(monkeypatch: pytest.MonkeyPatch, capsys, quick: bool):
    from clipforge.demo.sources import default_cache_dir

    prepared = []

    def record(cache_dir, config=None, data_dir=None, **kwargs):
        prepared.append((config, Path(data_dir) if data_dir else None))
        return demo_dataset.DemoDataset(Path(data_dir or "x"), None, None, None, [], {}, {})

    monkeypatch.setattr(demo_dataset, "prepare_demo_data", record)
    status, out, _ = run_cli(capsys, "demo", "--prepare-only", *(["--quick"] if quick else []))
    assert status == 0 and len(prepared) == 1
    config, folder = prepared[0]  # None: prepare_demo_data's defaults, the full set in data-64px
    expected = default_cache_dir() / ("data-64px-quick" if quick else "data-64px")  # where run_demo trains
    assert (folder or default_cache_dir() / "data-64px") == expected
    assert ((config or DemoDataConfig()).max_per_source is not None) is quick  # --quick: a slice
    assert out.strip().endswith("clipforge demo --quick") is quick  # the command that trains on it
