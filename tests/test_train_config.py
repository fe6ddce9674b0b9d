"""Training config, presets, overrides, validation, optimizer groups and the learning-rate schedule."""
import math

import pytest
import torch

import clipforge
from clipforge.train import TrainConfig, apply_overrides, available_presets, load_preset, validate
from clipforge.train.optim import build_optimizer, build_scheduler, cosine_with_warmup


def _valid_config(**fields) -> TrainConfig:
    config = TrainConfig(**fields)
    config.data.train = "pairs.csv"
    return config


def test_every_config_field_has_a_comment():
    import dataclasses
    import inspect

    from clipforge.train import config as module

    source = inspect.getsource(module)
    for section in (module.ModelSection, module.DataSection, module.LossSection, module.OptimSection,
                    module.RunSection, module.TrainConfig):
        for f in dataclasses.fields(section):
            if dataclasses.is_dataclass(f.type) or f.name in ("model", "data", "loss", "optim", "run"):
                continue
            line = next(line for line in source.splitlines() if line.strip().startswith(f"{f.name}:"))
            index = source.splitlines().index(line)
            previous = source.splitlines()[index - 1].strip()
            assert "#" in line or previous.startswith("#"), f"{section.__name__}.{f.name} has no comment"


def test_overrides_parse_each_field_type():
    config = apply_overrides(TrainConfig(), [
        "optim.lr=1e-4", "batch_size=64", "model.lock_image=true", "optim.betas=0.9,0.95",
        "optim.grad_clip_norm=1.5", "chunk_size=none", "data.crop_scale=(0.5, 1.0)", "steps=2e3",
    ])
    assert config.optim.lr == 1e-4 and config.batch_size == 64 and config.model.lock_image is True
    assert config.optim.betas == (0.9, 0.95) and config.optim.grad_clip_norm == 1.5
    assert config.chunk_size is None and config.data.crop_scale == (0.5, 1.0) and config.steps == 2000


@pytest.mark.parametrize("override, message", [
    ("optim.learning_rate=1", "unknown config key 'optim.learning_rate'"),
    ("nosuch.lr=1", "unknown config section 'nosuch'"),
    ("batch_size=lots", "batch_size must be int"),
    ("model.compile=maybe", "model.compile must be true or false"),
    ("optim.lr", "must look like key=value"),
])
def test_bad_override_names_the_key(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        apply_overrides(TrainConfig(), [override])


def test_config_round_trips_through_a_dict():
    config = apply_overrides(TrainConfig(), ["optim.betas=0.8,0.9", "loss.kind=siglip"])
    assert TrainConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("fields, world_size, device, message", [
    ({"batch_size": 10}, 4, "cpu", "batch_size 10 is not divisible by the 4 processes"),
    ({"batch_size": 8, "chunk_size": 3}, 1, "cpu", "chunk_size 3 must divide the per-process batch 8"),
    ({"precision": "fp16"}, 1, "cpu", "fp16 needs CUDA.*use precision=bf16"),
    ({"precision": "fp8"}, 1, "cpu", "precision must be one of fp32, bf16, fp16, got 'fp8'"),
    ({"seed": -1}, 1, "cpu", r"seed must lie in \[0, 2\*\*32 - 1\], got -1"),
    ({"seed": 2 ** 32}, 1, "cpu", "seed must lie in"),
])
def test_validate_rejects_bad_settings_in_one_line(fields, world_size, device, message):
    with pytest.raises(ValueError, match=message) as info:
        validate(_valid_config(**fields), world_size=world_size, device_type=device)
    assert "\n" not in str(info.value)


def test_validate_requires_training_data():
    with pytest.raises(ValueError, match="no training data"):
        validate(TrainConfig())


@pytest.mark.parametrize("name", available_presets())
def test_bundled_presets_load_and_validate(name):
    config = load_preset(name)
    config.data.train = "pairs.csv"
    validate(config, world_size=8, device_type="cuda")


def test_preset_from_toml_and_python_files(tmp_path):
    toml = tmp_path / "mine.toml"
    toml.write_text('batch_size = 32\n[optim]\nlr = 3e-4\nbetas = [0.9, 0.99]\n')
    config = load_preset(str(toml))
    assert config.batch_size == 32 and config.optim.lr == 3e-4 and config.optim.betas == (0.9, 0.99)
    py = tmp_path / "mine.py"
    py.write_text("from clipforge.train import TrainConfig\n\ndef config():\n    return TrainConfig(steps=7)\n")
    assert load_preset(str(py)).steps == 7
    with pytest.raises(FileNotFoundError, match="preset 'nope'"):
        load_preset("nope")
    (tmp_path / "bad.toml").write_text("[optim]\nlr = 1\nmomentum = 0.9\n")
    with pytest.raises(ValueError, match="unknown config key 'optim.momentum'"):
        load_preset(str(tmp_path / "bad.toml"))


def test_no_weight_decay_on_gains_biases_embeddings_and_logit_scale():
    model = clipforge.create_model("tiny-vit")
    config = TrainConfig().optim
    optimizer = build_optimizer([model], config)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert optimizer.param_groups[0]["weight_decay"] == config.weight_decay
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    for name, param in model.named_parameters():
        exempt = param.ndim < 2 or "embedding" in name or name == "logit_scale"
        assert (id(param) not in decayed) == exempt, name
    assert optimizer.defaults["betas"] == (0.9, 0.98) and optimizer.defaults["eps"] == 1e-6


def test_locked_tower_parameters_are_not_optimized():
    model = clipforge.create_model("tiny-vit")
    model.lock_image_tower()
    optimizer = build_optimizer([model], TrainConfig().optim)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not any(id(p) in optimized for p in model.visual.parameters())
    assert id(model.logit_scale) in optimized


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero():
    assert cosine_with_warmup(0, 10, 100) == pytest.approx(0.1)
    assert cosine_with_warmup(9, 10, 100) == pytest.approx(1.0)
    assert cosine_with_warmup(10, 10, 100) == pytest.approx(1.0)
    assert cosine_with_warmup(55, 10, 100) == pytest.approx(0.5)
    assert cosine_with_warmup(100, 10, 100) == pytest.approx(0.0, abs=1e-12)
    param = torch.nn.Parameter(torch.zeros(2, 2))
    optimizer = torch.optim.AdamW([param], lr=1.0)
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx(expected)


def test_each_process_of_a_node_needs_its_own_gpu(monkeypatch):
    from clipforge.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", 1) == torch.device("cuda", 1)
    assert resolve_device("cpu", 5) == torch.device("cpu")
    for requested in ("auto", "cuda"):
        with pytest.raises(ValueError, match=r"LOCAL_RANK=2 needs a GPU of its own but 2 CUDA device\(s\) are "
                                             r"visible: .*--nproc_per_node=2\), or run on the CPU with device=cpu"):
            resolve_device(requested, 2)


@pytest.mark.parametrize("override, message", [
    ("model.patch_dropout=1.0", r"model.patch_dropout must lie in \[0, 1\), got 1.0"),
    ("data.weights=2", "data.weights weighs data.sources"),
])
def test_validate_names_the_section_of_the_key(override, message):
    with pytest.raises(ValueError, match=message):
        validate(apply_overrides(_valid_config(), [override]))


def test_a_broken_preset_file_is_one_line_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="preset .*missing.toml: no such file"):
        load_preset(str(tmp_path / "missing.toml"))
    cases = {"syntax.py": ("def config(:\n", r"syntax.py \(line 1\): SyntaxError"),
             "imports.py": ("import no_such_module_here\n", "imports.py: ModuleNotFoundError: No module named"),
             "keys.toml": ("[optim]\nmomentum = 1\n", "keys.toml: unknown config key 'optim.momentum'"),
             "types.toml": ("batch_size = 'lots'\n", "types.toml: batch_size must be int")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message) as info:
            load_preset(str(tmp_path / name))
        assert "\n" not in str(info.value)
    (tmp_path / "latin1.toml").write_bytes(b"# caf\xe9\nbatch_size = 8\n")
    with pytest.raises(ValueError, match="latin1.toml: not UTF-8 text"):
        load_preset(str(tmp_path / "latin1.toml"))


def test_an_unknown_eval_dataset_is_refused_before_training(tmp_path):
    from clipforge.train.evaluation import parse_eval_sets

    config = _valid_config()
    config.eval.zeroshot = [{"name": "r", "data": str(tmp_path), "dataset": "imagenet-rr"}]
    with pytest.raises(ValueError, match=r"eval.zeroshot\[0\]: unknown dataset 'imagenet-rr'; expected one of"):
        parse_eval_sets(config.eval)
    config.eval.zeroshot = [{"name": "r", "data": str(tmp_path), "dataset": "ImageNet_R"}]
    assert parse_eval_sets(config.eval)[0].name == "r"
