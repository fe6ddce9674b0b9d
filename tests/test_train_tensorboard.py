"""``run.tensorboard=true`` writes the same scalars as metrics.jsonl, read back from the event file."""
import pytest

from clipforge.train import TrainConfig, train
from clipforge.train.log import read_metrics

from _train_data import make_shapes

pytestmark = pytest.mark.slow  # trains, spawns processes or serves: left out of -m 'not slow'


def test_tensorboard_events_hold_the_logged_losses(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    config = TrainConfig(batch_size=8, steps=4, device="cpu")
    config.data.train = str(make_shapes(tmp_path / "data", 16))
    config.data.workers = 0
    config.run.run_dir = str(tmp_path / "run")
    config.run.progress = False
    config.run.tensorboard = True
    config.run.log_every = 1
    result = train(config)
    logged = {row["step"]: row["loss"] for row in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in row}
    assert sorted(logged) == [1, 2, 3, 4] and len(result.losses) == 4
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert "train/loss" in events.Tags()["scalars"]
    from_events = {event.step: event.value for event in events.Scalars("train/loss")}
    assert from_events.keys() == logged.keys()
    assert all(from_events[step] == pytest.approx(logged[step], rel=1e-6) for step in logged)
