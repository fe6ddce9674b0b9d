"""``clipforge serve`` from the command line: a real process on a loopback port, and its checks."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("faiss")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from _search_fixtures import build_search_fixture  # noqa: E402
from clipforge.cli import build_parser, main  # noqa: E402

pytestmark = pytest.mark.slow  # trains, spawns processes or serves: left out of -m 'not slow'

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def fixture(tmp_path_factory):
    return build_search_fixture(tmp_path_factory.mktemp("serve-cli"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_binds_loopback_by_default():
    args = build_parser().parse_args(["serve", "out", "--model", "m"])
    assert (args.host, args.port, args.max_k) == ("127.0.0.1", 1234, 1000)


def test_serve_process_answers_then_stops_on_ctrl_c(fixture, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "stderr.txt", "w+")
    process = subprocess.Popen([sys.executable, "-m", "clipforge.cli", "serve", str(fixture.shapes),
                                str(fixture.imageonly), "--model", str(fixture.model_dir), "--port", str(port)],
                               env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (tmp_path / "stderr.txt").read_text()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.3)
        assert health.json()["collections"] == {"shapes": 27, "imageonly": 27}
        answer = httpx.get(f"http://127.0.0.1:{port}/search", params={"q": "a green triangle", "modality": "text"})
        assert answer.json()["results"][0]["caption"] == "a green triangle"
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=60)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert code == 0, stderr
    assert f"serving shapes, imageonly on http://127.0.0.1:{port}/" in stderr
    assert "warning" not in stderr  # the checkpoint is the model that embedded both collections


def test_other_model_warns_once_per_collection(fixture, capsys):
    from clipforge.cli.serve import build_app
    args = build_parser().parse_args(["serve", str(fixture.shapes), "--model", "tiny-vit", "--seed", "3"])
    app = build_app(args)
    app.state.service.encoder.close()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "is not the model that embedded it" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: shapes: --model tiny-vit")


@pytest.mark.parametrize("argv, message", [
    (["--model", "small-vit"], "embeddings have dim 32, but --model small-vit embeds to 256"),
    (["--port", "70000"], "--port must be 1..65535"),
])
def test_serve_refuses_bad_arguments_in_one_line(fixture, capsys, argv, message):
    # a free --port first: the port is bound before anything else is checked (argv's --port wins)
    assert main(["serve", str(fixture.shapes), "--model", str(fixture.model_dir), "--port", str(free_port()),
                 *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("clipforge serve: error:") and message in err


def test_serve_refuses_missing_folder_and_name_clash(fixture, tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nope"), "--model", str(fixture.model_dir), "--port", str(free_port())]) == 2
    assert "nope: not a collection folder" in capsys.readouterr().err
    shutil.copytree(fixture.imageonly, tmp_path / "imageonly")
    assert main(["serve", str(fixture.imageonly), str(tmp_path / "imageonly"), "--model",
                 str(fixture.model_dir), "--port", str(free_port())]) == 2
    assert "two collections are named 'imageonly'" in capsys.readouterr().err
