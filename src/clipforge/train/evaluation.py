"""Evaluation while training: zero-shot sets and held-out pairs, every few steps and at the end.

``eval.zeroshot`` lists classification sets (``{name, data, dataset, classnames, templates}``),
``eval.retrieval`` held-out image-caption listings (``{name, data}``): recall@k both ways and the
held-out contrastive loss, computed as the training loss is (same loss, batches of the training
batch size), so the two curves can be read together and overfitting shows. Rank 0 evaluates while
the other processes wait, on a gloo group of their own whose timeout is ``eval.wait_minutes`` (the
training's process group times out after 30 minutes, which a long evaluation may outlast); a failed
evaluation is logged and training goes on. The listings, class names, templates and protocol
layouts are read when the run starts, so a mistake in them stops it before the first step; a set
with ``dataset`` is scored by its protocol, as ``clipforge eval zeroshot --dataset`` scores it.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..loss import Objective
from .resume import rng_state, set_rng_state


@dataclass
class EvalSet:
    """One evaluation set of the config, its data read once."""

    kind: str  # "zeroshot" or "retrieval"
    name: str
    spec: dict[str, Any]
    data: Any = None
    where: str = ""  # the config entry, e.g. "eval.zeroshot[0]", for error messages


def parse_eval_sets(section) -> list[EvalSet]:
    """The config's ``eval.zeroshot`` and ``eval.retrieval`` entries, checked; raises ``ValueError`` naming the entry."""
    sets, names = [], set()
    for kind, entries in (("zeroshot", section.zeroshot), ("retrieval", section.retrieval)):
        if not isinstance(entries, list):
            raise ValueError(f"eval.{kind} must be a list of {{name, data}} tables, got {entries!r}")
        for position, entry in enumerate(entries):
            where = f"eval.{kind}[{position}]"
            if isinstance(entry, str):
                entry = {"data": entry}
            if not isinstance(entry, dict) or not entry.get("data"):
                raise ValueError(f"{where} must be a table with a 'data' path, got {entry!r}")
            allowed = _ALLOWED_KEYS[kind]  # a retrieval set has no prompts: templates there would be ignored
            unknown = sorted(set(entry) - allowed)
            if unknown:
                raise ValueError(f"{where}: unknown key {unknown[0]!r}; expected some of {sorted(allowed)}")
            if kind == "zeroshot":
                _check_prompts(entry, where)
            if not Path(str(entry["data"])).expanduser().exists():
                raise FileNotFoundError(f"{where}: data {entry['data']} does not exist")
            name = str(entry.get("name") or Path(str(entry["data"])).name)
            if "/" in name or not name.strip():
                raise ValueError(f"{where}: name {name!r} must be non-empty and without '/' (metrics are "
                                 f"logged as eval/<name>/<metric>)")
            if name in names:
                raise ValueError(f"{where}: the name {name!r} is used twice; give each set its own name")
            names.add(name)
            sets.append(EvalSet(kind, name, dict(entry), where=where))
    return sets


_ALLOWED_KEYS = {"zeroshot": {"name", "data", "dataset", "classnames", "templates", "images"},
                 "retrieval": {"name", "data", "images"}}


def _check_prompts(entry: dict[str, Any], where: str) -> None:
    """A zero-shot entry's ``dataset`` and ``templates`` checked now, not after the training."""
    from ..evaluate import resolve_templates

    if entry.get("dataset"):
        from ..evaluate.protocols import canonical_name

        try:
            canonical_name(str(entry["dataset"]))
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if entry.get("classnames") is not None:
            raise ValueError(f"{where}: classnames does not apply with dataset: the protocol names its classes")
    templates = entry.get("templates")
    if templates is not None:
        if not (isinstance(templates, str) or (isinstance(templates, list)
                                               and all(isinstance(t, str) for t in templates))):
            raise ValueError(f"{where}: templates must be a name, a file or a list of strings, got {templates!r}")
        try:
            resolve_templates(templates)
        except (ValueError, OSError) as error:
            raise ValueError(f"{where}: {str(error).splitlines()[0]}") from None


class PeriodicEvaluation:
    """Runs the evaluation sets on rank 0 when due; returns the metrics to log."""

    def __init__(self, section, batch_size: int, context, objective: torch.nn.Module | None = None):
        """``objective``: the training loss (``clipforge.loss.Objective``), so the held-out loss is the
        same loss (SigLIP's with its bias); without it the held-out loss is CLIP's contrastive loss."""
        self.sets = parse_eval_sets(section)
        self.every_steps, self.batch_size, self.context = section.every_steps, batch_size, context
        self.times = section.times
        self._reached: int | None = None  # eval.times: how many of the even fractions the run has passed
        self.eval_batch_size = section.batch_size
        self.objective = objective if objective is not None else Objective("clip")
        self.wait_minutes = float(section.wait_minutes)
        # Several processes: the gloo group the others wait on (see _wait_for_main), made now, while
        # every process builds its run alike (creating a group is collective).
        self._wait_group = self._new_wait_group() if context.world_size > 1 else None
        self._load_all()

    def _new_wait_group(self):
        """A gloo group over all processes with the ``eval.wait_minutes`` timeout; every process must call it."""
        return dist.new_group(backend="gloo", timeout=timedelta(minutes=self.wait_minutes))

    def _load_all(self) -> None:
        """Read every set's listing now, on every process, so a broken listing, class-name file or
        protocol layout stops the run before it trains (each process stops alike) instead of
        failing at every evaluation. Images are read when scored: a file broken later is a logged
        failure of that evaluation. Only rank 0 keeps the listings."""
        from ..evaluate import load_classification_data, load_retrieval_data, resolve_classnames

        saved = rng_state()
        try:
            for eval_set in self.sets:
                spec = eval_set.spec
                try:
                    if eval_set.kind == "zeroshot":
                        data = _classification_data(load_classification_data, spec)
                        if not _is_protocol(data):
                            resolve_classnames(spec.get("classnames"), data.classes)  # checks them too
                        if len(data.classes) < 2:  # else refused at every evaluation, only logged
                            raise ValueError(f"{spec['data']}: one class ({data.classes[0]!r}); zero-shot "
                                             "classification needs at least two (is it the folder above "
                                             "the class folders?)")
                    else:
                        data = load_retrieval_data(spec["data"], spec.get("images"))
                except (ValueError, OSError, KeyError, TypeError) as error:
                    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    kind = FileNotFoundError if isinstance(error, FileNotFoundError) else ValueError
                    raise kind(f"{eval_set.where}: {message}") from None
                eval_set.data = data if self.context.is_main else None
        finally:
            set_rng_state(saved)

    def due(self, step: int, total_steps: int) -> bool:
        """Whether to evaluate after ``step``: every ``every_steps`` steps, or when the run has passed
        one more of ``times`` even fractions of ``total_steps`` (read now: a ``minutes`` run re-plans
        it) since the last evaluation, and at the last step. Call it after every step."""
        if not self.sets:
            return False
        if self.times > 0 and step < total_steps:
            if self._reached is None:  # this process's first step (resumed: the fractions passed before)
                self._reached = (step - 1) * self.times // total_steps
            reached = step * self.times // total_steps
            # passed since the last evaluation, against a count kept here: a total that shrinks at
            # every step (a slowing machine) moves the fractions past steps never compared with them
            due, self._reached = reached > self._reached, max(reached, self._reached)
            return due
        return step == total_steps or (self.every_steps > 0 and step % self.every_steps == 0)

    def __call__(self, model: torch.nn.Module, step: int | None = None) -> dict[str, Any]:
        """Every set's metrics as ``{"eval/<name>/<metric>": value}`` on rank 0 (``{}`` elsewhere).

        The random streams (Python, NumPy, torch CPU and CUDA) are put back as they were: the
        evaluation's loaders draw from them, and the training must go on with the streams its last
        checkpoint saved, or a resumed run would draw other patch-dropout masks than an uninterrupted one.
        ``step`` (the training step) only names the moment in an error.
        """
        saved = rng_state()
        modes = [(module, module.training) for module in model.modules()]  # e.g. a locked tower in eval mode
        try:
            return self._evaluate_all(model, step)
        finally:
            set_rng_state(saved)
            for module, training in modes:  # exactly as before, whatever an evaluation left behind
                module.training = training

    def _evaluate_all(self, model: torch.nn.Module, step: int | None) -> dict[str, Any]:
        values: dict[str, Any] = {}
        try:
            if self.context.is_main:
                started = time.perf_counter()
                for eval_set in self.sets:
                    try:
                        metrics = self._evaluate(model, eval_set)
                    except Exception as err:  # an evaluation failure must not stop the training
                        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                        values[f"eval/{eval_set.name}/error"] = f"{type(err).__name__}: {first[:300]}"
                        continue
                    values.update({f"eval/{eval_set.name}/{key}": value for key, value in metrics.items()})
                values["eval/seconds"] = round(time.perf_counter() - started, 3)
        finally:
            if self.context.world_size > 1:
                self._wait_for_main(step)
        return values

    def _wait_for_main(self, step: int | None) -> None:
        """Every process meets here after rank 0's evaluation. The barrier runs on the evaluation's
        own gloo group: the training group's timeout (30 minutes) would stop the waiting processes
        during a long evaluation, this one allows ``eval.wait_minutes``."""
        started = time.monotonic()
        try:
            dist.barrier(group=self._wait_group)
        except RuntimeError as error:
            after = f" after step {step}" if step is not None else ""
            first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            if time.monotonic() - started < 0.9 * self.wait_minutes * 60:  # not the limit: a process went away
                raise RuntimeError(f"rank {self.context.rank}: a process stopped during the evaluation{after} "
                                   f"({first})") from None
            raise RuntimeError(f"rank {self.context.rank} waited {self.wait_minutes:g} minutes for rank 0's "
                               f"evaluation{after} and stopped ({first}); if evaluations take that long, raise "
                               "eval.wait_minutes") from None

    def _evaluate(self, model: torch.nn.Module, eval_set: EvalSet) -> dict[str, float]:
        from ..evaluate import evaluate_retrieval, evaluate_zeroshot  # the listings were read at start (_load_all)
        from ..transforms import image_transform

        device = self.context.device
        preprocess = image_transform(model.config.vision.image_size)
        spec = eval_set.spec
        if eval_set.kind == "zeroshot":
            if _is_protocol(eval_set.data):  # scored as `clipforge eval zeroshot --dataset` scores it
                from ..evaluate.protocols import evaluate_protocol

                result = evaluate_protocol(model, eval_set.data, "subset", spec.get("templates"), preprocess,
                                           self.eval_batch_size, device=device, cache_dir=None, progress=False)
                return {key: float(value) for key, value in result.metrics.items()}
            result = evaluate_zeroshot(model, eval_set.data, spec.get("classnames"), spec.get("templates", "imagenet"),
                                       preprocess, self.eval_batch_size, device=device, cache_dir=None,
                                       progress=False)
            return {key: float(value) for key, value in result.metrics.items()}
        report = evaluate_retrieval(model, eval_set.data, preprocess, batch_size=self.eval_batch_size, device=device,
                                    cache_dir=None, progress=False)
        metrics = {key: float(value) for key, value in report["metrics"].items()}
        metrics["loss"] = self._heldout_loss(model, eval_set.data, preprocess)
        return metrics

    def _heldout_loss(self, model: torch.nn.Module, data, preprocess) -> float:
        """The contrastive loss on held-out pairs (each image with its first caption), in training-size batches."""
        from ..evaluate import encode_images, encode_texts

        first_caption: dict[int, str] = {}
        for text, image in zip(data.texts, data.text_to_image):
            first_caption.setdefault(image, text)
        images = encode_images(model, data.image_paths, preprocess, self.eval_batch_size, device=self.context.device,
                               progress=False)
        read = images.indices.tolist()
        texts = encode_texts(model, [first_caption[i] for i in read], device=self.context.device,
                             progress=False)  # (n, D), row k describes image read[k]
        logit_scale = model.logit_scale.detach().float().cpu()
        order = torch.randperm(len(read), generator=torch.Generator().manual_seed(0))  # mixed as training batches are
        image_features, text_features = images.features[order].float(), texts[order].float()  # (n, D) each
        losses, weights = [], []
        for start in range(0, len(read) - 1, self.batch_size):  # a last batch of one pair has no negatives
            stop = min(start + self.batch_size, len(read))
            if stop - start < 2:
                break
            with torch.no_grad():
                loss = self.objective(image_features[start:stop], text_features[start:stop], logit_scale, gather=False)
            losses.append(float(loss) * (stop - start))
            weights.append(stop - start)
        return sum(losses) / sum(weights) if weights else math.nan


def _is_protocol(data) -> bool:
    """Whether ``data`` was read by a named protocol (``dataset``), which scores it its own way."""
    from ..evaluate.protocols import ProtocolData

    return isinstance(data, ProtocolData)


def _classification_data(load, spec: dict[str, Any]):
    """A zero-shot set's data: a named protocol (``dataset``) when this clipforge knows it."""
    if spec.get("dataset"):
        try:
            return load(spec["data"], spec.get("images"), dataset=spec["dataset"])
        except TypeError:
            raise ValueError(f"eval.zeroshot: dataset={spec['dataset']!r} needs a clipforge that knows the "
                             "dataset protocols") from None
    return load(spec["data"], spec.get("images"))
