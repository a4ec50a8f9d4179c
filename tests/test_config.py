"""Config loading: precedence, override errors with suggestions, type errors, required OOM keys, stage overrides."""

import re
from pathlib import Path

import pytest
import yaml

from pillsnap.config import ConfigError, apply_stage_overrides, load_config, stage_settings

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config.yaml"


def write_cfg(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def minimal(**train) -> dict:
    oom = {"max_retries": 4, "max_grad_accum": 8, "min_batch": 1, "cooldown_sec": 0, "escalate_to_fp16": True}
    return {"train": {"oom": oom, **train}}


def test_repo_config_loads_and_matches_defaults():
    cfg = load_config(CONFIG, dotenv_path=None)
    assert cfg.model.backbone == "tf_efficientnetv2_s"
    assert list(cfg.train.interleave_ratio) == [1, 1]
    assert cfg.data.progressive_validation.stage_4.max_classes == 5000


def test_repo_config_is_the_packaged_defaults_byte_for_byte():
    """One source of defaults: the packaged default.yaml (what an installed wheel reads) and the repo's config.yaml
    (what users edit and the README documents) must not drift apart."""
    from pillsnap.config.loader import DEFAULT_CONFIG

    assert DEFAULT_CONFIG.read_bytes() == CONFIG.read_bytes()


def test_precedence_cli_over_file_over_defaults(tmp_path):
    path = write_cfg(tmp_path, minimal(batch_size=64, lr=0.01))
    cfg = load_config(path, ["train.batch_size=128"], dotenv_path=None)
    assert cfg.train.batch_size == 128  # CLI wins
    assert cfg.train.lr == 0.01  # file wins over defaults
    assert cfg.train.epochs == 10  # default fills the rest


def test_dotenv_fills_only_null_serving_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("PILLSNAP_SERVING_API_KEY", raising=False)
    env = tmp_path / ".env"
    env.write_text("# secrets\nPILLSNAP_SERVING_API_KEY='s3cret'\nPILLSNAP_SERVING_PORT=9999\nOTHER=1\n")
    cfg = load_config(write_cfg(tmp_path, minimal()), dotenv_path=env)
    assert cfg.serving.api_key == "s3cret"
    assert cfg.serving.port == 8000  # set in the config, so .env does not override it


def test_unknown_override_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"train\.batchsize.*Did you mean 'train\.batch_size'"):
        load_config(CONFIG, ["train.batchsize=128"], dotenv_path=None)


def test_unknown_file_key_is_an_error(tmp_path):
    data = minimal()
    data["model"] = {"backbon": "resnet18"}
    with pytest.raises(ConfigError, match="model.backbon.*model.backbone"):
        load_config(write_cfg(tmp_path, data), dotenv_path=None)


def test_type_error_names_key():
    with pytest.raises(ConfigError, match=r"train\.batch_size' must be int, got str"):
        load_config(CONFIG, ["train.batch_size=big"], dotenv_path=None)


def test_float_key_accepts_int_but_bool_does_not_accept_int():
    assert load_config(CONFIG, ["train.lr=1"], dotenv_path=None).train.lr == 1
    with pytest.raises(ConfigError, match="train.deterministic"):
        load_config(CONFIG, ["train.deterministic=3"], dotenv_path=None)


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config(CONFIG, ["train.batch_size"], dotenv_path=None)


@pytest.mark.parametrize("missing", ["max_retries", "max_grad_accum", "min_batch", "cooldown_sec", "escalate_to_fp16"])
def test_missing_oom_key_fails_naming_it(tmp_path, missing):
    data = minimal()
    del data["train"]["oom"][missing]
    with pytest.raises(ConfigError, match=rf"train\.oom\.{missing}"):
        load_config(write_cfg(tmp_path, data), dotenv_path=None)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="Cannot parse"):
        load_config(bad)


def test_stage_overrides_applied_without_mutating_input():
    cfg = load_config(CONFIG, ["train.stage_overrides.stage_2={batch_size_override: 8, num_workers_override: 1}"],
                      dotenv_path=None)
    staged = apply_stage_overrides(cfg, 2)
    assert staged.train.batch_size == 8 and staged.dataloader.num_workers == 1
    assert cfg.train.batch_size == 32
    staged3 = apply_stage_overrides(cfg, 3)
    assert staged3.optimization.torch_compile == "max-autotune" and staged3.optimization.channels_last is True
    assert staged3.train.auto_batch_vram_headroom == 0.92 and cfg.train.auto_batch_vram_headroom == 0.88
    assert apply_stage_overrides(cfg, 1) is cfg
    given = load_config(CONFIG, ["train.auto_batch_vram_headroom=0.8"], dotenv_path=None)  # the command line wins
    assert apply_stage_overrides(given, 4).train.auto_batch_vram_headroom == 0.8
    with pytest.raises(ConfigError, match="auto_batch_vram_headroom"):
        load_config(CONFIG, ["train.stage_overrides.stage_3.auto_batch_vram_headroom=1.5"], dotenv_path=None)


def test_unknown_stage_override_key():
    with pytest.raises(ConfigError, match="compile_mod.*compile_mode"):
        load_config(CONFIG, ["train.stage_overrides.stage_1={compile_mod: none}"], dotenv_path=None)


def test_stage_settings():
    cfg = load_config(CONFIG, ["data.progressive_validation.current_stage=2"], dotenv_path=None)
    assert stage_settings(cfg).max_classes == 250
    assert stage_settings(cfg, 1).max_samples == 5000
    with pytest.raises(ValueError, match="stage_7"):
        stage_settings(cfg, 7)


@pytest.mark.parametrize(("override", "message"), [
    ("train.memory_warning_ratio=80", "train.memory_warning_ratio=80 is out of range: it must be > 0 and <= 1 "
                                      "(a share above 0)"),
    ("train.batch_size=0", "train.batch_size=0 is out of range: it must be >= 1"),
    ("train.detection.lr=-0.001", "train.detection.lr=-0.001 is out of range: it must be > 0"),
    ("data.progressive_validation.current_stage=5", "current_stage=5 is out of range: it must be >= 1 and <= 4"),
    ("data.progressive_validation.stage_3.max_classes=0", "stage_3.max_classes=0 is out of range: it must be >= 1"),
    ("inference.prediction_set.coverage=1.0", "coverage=1.0 is out of range: it must be > 0 and < 1"),
    ("train.ema.decay=1.0", "train.ema.decay=1.0 is out of range: it must be >= 0 and < 1 (a decay below 1)"),
    ("serving.port=70000", "serving.port=70000 is out of range: it must be >= 0 and <= 65535 (a TCP port; 0: any "
                           "free one)"),
    # a list's numbers, each with its place
    ("train.interleave_ratio=[1,-1]", "train.interleave_ratio[1]=-1 is out of range: it must be >= 0"),
    ("dataloader.autotune_candidates=[4,-2,8]", "dataloader.autotune_candidates[1]=-2 is out of range"),
    ("data.crop_jitter.shift=0.3", "data.crop_jitter.shift=0.3 is out of range: it must be >= 0 and <= 0.25"),
])
def test_a_number_out_of_its_range_is_refused_naming_key_value_and_range(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [override], dotenv_path=None)


def test_each_key_takes_its_own_range_not_a_lookalikes():
    """`train.*lr` once took `train.detection.augment.fliplr` too, and a flip probability of 0 was refused."""
    from pillsnap.config.ranges import POSITIVE, PROBABILITY, range_of

    assert range_of("train.detection.augment.fliplr") is PROBABILITY and range_of("train.detection.lr") is POSITIVE
    cfg = load_config(None, ["train.detection.augment.fliplr=0", "train.detection.augment.flipud=0"],
                      dotenv_path=None)
    assert cfg.train.detection.augment.fliplr == 0


def test_numbers_whose_default_is_null_and_stage_overrides_are_checked_too(tmp_path):
    from pillsnap.engine.run import run_training

    with pytest.raises(ConfigError, match="train.max_steps_per_epoch=-3 is out of range"):
        load_config(None, ["train.max_steps_per_epoch=-3"], dotenv_path=None)
    with pytest.raises(ConfigError, match="stage_1.batch_size_override=-4 is out of range"):
        load_config(None, ["train.stage_overrides.stage_1.batch_size_override=-4"], dotenv_path=None)
    cfg = load_config(None, [f"paths.exp_dir={tmp_path / 'exp'}"], dotenv_path=None)
    cfg.train.checkpoint_interval_minutes = -5  # changed after loading (a notebook, a script): checked at the start
    with pytest.raises(ConfigError, match="train.checkpoint_interval_minutes=-5 is out of range"):
        run_training(cfg)
    assert not (tmp_path / "exp").exists()


def test_both_ends_of_a_range_and_null_are_accepted():
    cfg = load_config(None, ["train.memory_warning_ratio=1", "train.epochs=0", "train.grad_clip=null",
                             "data.progressive_validation.stage_1.time_limit_hours=0"], dotenv_path=None)
    assert cfg.train.memory_warning_ratio == 1 and cfg.train.epochs == 0 and cfg.train.grad_clip is None


def test_every_number_in_the_config_has_a_range_and_every_range_a_key():
    """A new numeric setting gets its range here too (seeds excepted); a pattern that names no key is a typo."""
    from fnmatch import fnmatchcase

    from omegaconf import ListConfig, OmegaConf

    from pillsnap.config.loader import _leaf_keys
    from pillsnap.config.ranges import RANGES, range_of

    cfg = load_config(None, [], dotenv_path=None)
    def numeric(value: object) -> bool:
        if isinstance(value, ListConfig):  # a list of numbers: each held to the key's range
            return any(numeric(v) for v in value)
        return isinstance(value, int | float) and not isinstance(value, bool)

    numbers = [k for k in _leaf_keys(cfg) if numeric(OmegaConf.select(cfg, k))]
    assert {"train.interleave_ratio", "dataloader.autotune_candidates"} <= set(numbers)
    assert [k for k in numbers if range_of(k) is None and not k.endswith("seed")] == []
    keys = _leaf_keys(cfg) + ["train.stage_overrides.stage_4.batch_size_override"]  # a key no default sets
    assert [p for p, _ in RANGES if not any(fnmatchcase(k, p) for k in keys)] == []


def test_tf32_must_agree_where_both_models_train(tmp_path):
    """TF32 is one process-wide switch in PyTorch: a detector section saying otherwise would silently decide it for
    the classifier too. Refused when a run trains (one line, exit 2), never when a trained run's config is read."""
    from pillsnap.config import check_tf32
    from pillsnap.train import main as train_main

    differ = load_config(CONFIG, ["train.detection.tf32=false"], dotenv_path=None)  # reading it is fine
    with pytest.raises(ConfigError, match=r"train\.classification\.tf32 \(true\) and train\.detection\.tf32 \(false\) "
                                          r"differ.*set both the same"):
        check_tf32(differ)
    check_tf32(load_config(CONFIG, ["train.detection.tf32=false", "train.classification.tf32=false"],
                           dotenv_path=None))
    check_tf32(load_config(CONFIG, ["train.detection.tf32=false", "train.strategy=classification"], dotenv_path=None))
    assert train_main(["--cfg", str(CONFIG), "train.detection.tf32=false", f"paths.exp_dir={tmp_path / 'exp'}"]) == 2
    assert not (tmp_path / "exp").exists()  # refused before anything was written
    assert train_main(["--cfg", str(CONFIG), "--check", "train.detection.tf32=false"]) == 2  # --check says so too


@pytest.mark.parametrize(("override", "named"), [("cache_enabled='yes please'", "must be true or false"),
                                                 ("cache_format=lmdb", "must be one of npy, jpeg"),
                                                 ("detection_export=png", "must be one of photos, jpeg"),
                                                 ("batch_size_override=many", "many")])
def test_a_stage_override_value_the_stage_could_not_apply_stops_the_config_load(override, named):
    with pytest.raises(ConfigError, match=f"train.stage_overrides.stage_3.{override.split('=')[0]}=.*{named}"):
        load_config(CONFIG, [f"train.stage_overrides.stage_3.{override}"], dotenv_path=None)
