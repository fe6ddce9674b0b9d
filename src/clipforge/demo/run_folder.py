"""What the demo's run folder holds: the identity of its run (``demo_run.json``), the refusal of a
folder that holds another run, and how far the saved training got."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

RUN_FILE = "demo_run.json"  # what identifies the run in its folder: model, batch size, step plan, data folder


class DemoRunFolderError(ValueError):
    """The run folder cannot hold this run (a file, or another run's checkpoints); one line."""


def check_run_folder(run_dir: Path, identity: dict) -> None:
    """Refuse ``run_dir`` when it is a file or its checkpoints belong to another run than ``identity``
    (model, batch size, step plan, data folder); a folder without checkpoints has nothing to resume."""
    from ..train.resume import list_checkpoints

    if run_dir.exists() and not run_dir.is_dir():
        raise DemoRunFolderError(f"--run-dir {run_dir}: is a file; expected a folder for the demo's run")
    found = list_checkpoints(run_dir)
    if not found:
        return
    saved, wanted = _describe(_saved_identity(run_dir, found[-1], identity)), _describe(identity)
    differences = [f"{saved[key]} (this call: {wanted[key]})" for key in wanted if saved[key] != wanted[key]]
    if differences:
        raise DemoRunFolderError(f"{run_dir} holds a run of {', '.join(differences)}; use another --run-dir, "
                                 f"or delete {run_dir} to start this one there")


def _describe(identity: dict) -> dict:
    steps, minutes = identity["steps"], identity["minutes"]
    return {"model": f"model {identity['model']!r}", "batch_size": f"batch size {identity['batch_size']}",
            "plan": f"{steps} steps" if steps is not None else f"a budget of {minutes:g} minutes",
            "data_dir": f"data from {identity['data_dir']}"}


def _saved_identity(run_dir: Path, checkpoint: Path, identity: dict) -> dict:
    """What identifies the run in ``run_dir``: its ``demo_run.json``, else (a folder of an older demo)
    what its training config says, with the minutes asked for now (the config does not hold them)."""
    from ..train.main import CONFIG_FILE
    from ..train.resume import read_training_state

    with contextlib.suppress(OSError, ValueError):
        saved = json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))
        if isinstance(saved, dict) and identity.keys() <= saved.keys():
            return saved
    path = run_dir / CONFIG_FILE
    config = (json.loads(path.read_text(encoding="utf-8")) if path.is_file()
              else read_training_state(checkpoint)["config"])
    steps = None if config.get("minutes") else config["steps"]
    return {"model": config["model"]["name"], "batch_size": config["batch_size"], "steps": steps,
            "minutes": identity["minutes"] if steps is None else None,
            "data_dir": str(Path(str(config["data"].get("train"))).resolve().parent)}


def saved_progress(checkpoint: Path) -> dict:
    """``step``, ``total_steps``, budget ``spent_s``, ``config`` and ``finished`` as ``checkpoint``
    recorded them (a ``minutes`` run re-plans its total, so the checkpoint's own record decides
    whether the run is finished)."""
    from ..train.resume import read_training_state

    state = read_training_state(checkpoint)
    total_steps = state.get("total_steps") or state["config"]["steps"]
    return {"step": state["step"], "total_steps": total_steps, "spent_s": state.get("budget_spent_s"),
            "config": state["config"], "finished": state["step"] >= total_steps}


def training_finished(run_dir: Path) -> bool:
    """Whether ``run_dir``'s newest checkpoint is the last step of its run (only evaluation is left)."""
    from ..train.resume import list_checkpoints

    found = list_checkpoints(run_dir)
    return bool(found) and saved_progress(found[-1])["finished"]
