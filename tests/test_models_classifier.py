"""Classifier builder (timm; pretrained weights fetched fast or not at all) and inference loading from training
checkpoints."""

from __future__ import annotations

import pytest
import torch

from pillsnap.models import build_classification_model, load_classifier_for_inference
from pillsnap.utils import save_ckpt


@pytest.mark.parametrize("backbone", ["test_efficientnet", "test_resnet"])
def test_builds_any_timm_name_with_the_requested_head(backbone):
    model = build_classification_model(backbone, num_classes=7).eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_channels_last_model_accepts_channels_last_input():
    model = build_classification_model("test_efficientnet", 3, channels_last=True).eval()
    conv = next(p for p in model.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert model(x).shape == (2, 3)


def test_bad_requests_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="Unknown timm backbone 'efficientnet_nope'"):
        build_classification_model("efficientnet_nope", 3)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_classification_model("test_efficientnet", 3, weights_path=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="num_classes"):
        build_classification_model("test_efficientnet", 0)


def test_local_weights_load_except_a_head_of_another_size(tmp_path):
    source = build_classification_model("test_efficientnet", 10)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = build_classification_model("test_efficientnet", 4, pretrained=True, weights_path=tmp_path / "w.pth")
    assert torch.equal(model.conv_stem.weight, source.conv_stem.weight)
    assert model.get_classifier().out_features == 4


def test_pretrained_weights_offline_fall_back_to_random_init_with_a_warning(monkeypatch, caplog):
    import huggingface_hub.constants

    # As on a machine with no network and an empty cache (and so that this test never downloads anything).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = build_classification_model("resnet18", 4, pretrained=True)
    assert model.get_classifier().out_features == 4
    assert "could not fetch pretrained resnet18 weights" in caplog.text and "model.weights_path" in caplog.text


def test_pretrained_is_the_default():
    from pillsnap.config import load_config

    assert load_config(None, dotenv_path=None).model.pretrained is True


@pytest.fixture
def silent_hub(monkeypatch, tmp_path):
    """A hub that accepts connections and never answers (a blocked network), an empty weights cache, and the
    offline switch off: the case where a download would otherwise wait on its timeouts."""
    import socket

    import huggingface_hub.constants

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    yield
    server.close()


def test_pretrained_with_the_hub_unreachable_starts_at_once_from_random_init(silent_hub, caplog):
    import time

    start = time.perf_counter()
    model = build_classification_model("resnet18", 4, pretrained=True)
    elapsed = time.perf_counter() - start
    assert model.get_classifier().out_features == 4
    assert elapsed < 7.0, f"waited {elapsed:.1f} s on an unreachable hub"
    assert "could not fetch pretrained resnet18 weights (offline: http://127.0.0.1:" in caplog.text
    assert "training from random init" in caplog.text


def test_a_local_weights_file_that_does_not_fit_is_named(tmp_path):
    torch.save(build_classification_model("test_resnet", 10).state_dict(), tmp_path / "other.pth")
    with pytest.raises(ValueError, match="does not fit backbone 'test_efficientnet'"):
        build_classification_model("test_efficientnet", 4, weights_path=tmp_path / "other.pth")


def test_a_file_timm_reads_nothing_from_is_refused_not_trained_from_random_init(tmp_path):
    """timm loads a file whose head differs without strictness: weights it cannot find (here under another key)
    would leave the backbone at its random init, with only a warning in timm's log."""
    torch.save({"weights": build_classification_model("test_efficientnet", 10).state_dict()}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"left \d+ of \d+ randomly initialised 'test_efficientnet' backbone"):
        build_classification_model("test_efficientnet", 4, weights_path=tmp_path / "w.pth")


def test_an_earlier_stages_checkpoint_starts_the_next_stage_from_its_validated_weights(tmp_path):
    """model.weights_path=<stage 3>/checkpoints/best.pt: the backbone from the checkpoint's validated (EMA)
    weights, a fresh head for the next stage's classes."""
    raw, ema = build_classification_model("test_efficientnet", 5), build_classification_model("test_efficientnet", 5)
    write_ckpt(tmp_path / "best.pt", raw, ema, "ema")
    model = build_classification_model("test_efficientnet", 9, weights_path=tmp_path / "best.pt")
    assert torch.equal(model.conv_stem.weight, ema.conv_stem.weight)
    assert not torch.equal(model.conv_stem.weight, raw.conv_stem.weight)
    assert model.get_classifier().out_features == 9
    with pytest.raises(ValueError, match="a PillSnap checkpoint of backbone 'test_efficientnet', not 'test_resnet'"):
        build_classification_model("test_resnet", 9, weights_path=tmp_path / "best.pt")


def write_ckpt(path, model, ema_model, validate):
    snapshot = {"model": {"backbone": "test_efficientnet", "num_classes": 5}, "train": {"ema": {"validate": validate}}}
    save_ckpt(path, {"model_state": model.state_dict(), "optimizer_state": {}, "scheduler_state": {},
                     "scaler_state": {}, "epoch": 1, "best_metric": 0.5, "config_snapshot": snapshot,
                     "ema_state": ema_model.state_dict()})


@pytest.mark.parametrize(("validate", "expect_ema"), [("ema", True), ("both", True), ("raw", False)])
def test_inference_loader_picks_ema_weights_when_they_were_validated(tmp_path, validate, expect_ema):
    raw, ema = build_classification_model("test_efficientnet", 5), build_classification_model("test_efficientnet", 5)
    write_ckpt(tmp_path / "best.pt", raw, ema, validate)
    model, snapshot = load_classifier_for_inference(tmp_path / "best.pt")
    expected = ema if expect_ema else raw
    assert not model.training and snapshot["model"]["num_classes"] == 5
    assert torch.equal(model.conv_stem.weight, expected.conv_stem.weight)


def test_a_local_files_fresh_head_follows_the_runs_seed(tmp_path):
    """The checks that every backbone weight loaded build the model under a seed: drawn from the run's generator,
    so the fresh head follows train.seed as without a file (not the same head for every seed)."""
    torch.save(build_classification_model("test_efficientnet", 10).state_dict(), tmp_path / "w.pth")
    heads = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        heads.append(build_classification_model("test_efficientnet", 4, weights_path=tmp_path / "w.pth")
                     .get_classifier().weight.detach().clone())
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])
