"""Classifier construction (any timm backbone, ImageNet weights through timm's own loader from the hub or a local
file, with an offline fallback) and loading a trained one for inference."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from pillsnap.utils import load_ckpt
from pillsnap.utils.io import select_inference_state
from pillsnap.utils.offline import RANDOM_UNWANTED, mark_weights, offline_reason

LOGGER = logging.getLogger(__name__)


def build_classification_model(
    backbone: str,
    num_classes: int,
    channels_last: bool = False,
    pretrained: bool = False,
    weights_path: str | Path | None = None,
) -> nn.Module:
    """timm model `backbone` with a fresh `num_classes` head.

    Pretrained backbones come through timm's own loader (the ImageNet head is dropped for ours): `weights_path`, a
    local timm/ImageNet weights file, always wins (a missing one is an error); else `pretrained=True` fetches the
    model's weights from the hub (or its local cache). Offline (HF_HUB_OFFLINE=1, or the hub silent for a few
    seconds) with nothing cached, the model starts from random weights at once, with a warning that says how to
    get them (run once online, or give model.weights_path).
    """
    import timm

    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not timm.is_model(backbone):
        close = timm.list_models(f"*{backbone.split('_')[0]}*")[:5]
        raise ValueError(f"Unknown timm backbone {backbone!r}. Similar names: {close}")
    if weights_path:
        model = _from_local_file(backbone, num_classes, Path(weights_path))
        mark_weights(model, f"file {weights_path}")
    elif pretrained:
        model = _from_hub(backbone, num_classes)
    else:
        model = timm.create_model(backbone, pretrained=False, num_classes=num_classes)
        mark_weights(model, "random (model.pretrained=false)")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _from_local_file(backbone: str, num_classes: int, path: Path) -> nn.Module:
    """The backbone's weights from `path`, a head of `num_classes` fresh: a timm/ImageNet weights file (through
    timm's loader) or a PillSnap checkpoint (an earlier stage's best.pt: its validated weights). Every backbone
    weight must come from the file: timm loads a file whose head differs without strictness, so a file it cannot
    read (a checkpoint's weights under `model_state`) would leave the model at its random init, silently."""
    import timm

    if not path.is_file():
        raise FileNotFoundError(f"model.weights_path does not exist: {path}")
    # the seed the model is built with comes from the run's own generator (train.seed decides the fresh head)
    seed = int(torch.randint(0, 2**62, (1,)))
    fresh = [_seeded(lambda: timm.create_model(backbone, pretrained=False, num_classes=num_classes), s)
             for s in (seed, seed + 1)]
    checkpoint = _pillsnap_checkpoint(path)
    if checkpoint is not None:
        model = _seeded(lambda: timm.create_model(backbone, pretrained=False, num_classes=num_classes), seed)
        _load_backbone(model, checkpoint, backbone, path)
    else:
        try:
            model = _seeded(lambda: timm.create_model(backbone, pretrained=True, num_classes=num_classes,
                                                      pretrained_cfg_overlay={"file": str(path)}), seed)
        except RuntimeError as err:  # timm's load names the keys that do not fit
            raise ValueError(f"model.weights_path {path} does not fit backbone {backbone!r}: {err}") from err
    # A weight drawn at random (it differs between two seeds' inits) and still equal to the first's, the seed the
    # model was built with, was not loaded. Weights set to a constant (a norm layer's ones) cannot be told apart.
    head = _head_prefixes(model)
    init = [dict(f.named_parameters()) for f in fresh]
    drawn = [(name, p) for name, p in model.named_parameters()
             if not name.startswith(head) and not torch.equal(init[0][name], init[1][name])]
    unloaded = [name for name, p in drawn if torch.equal(p, init[0][name])]
    if unloaded:
        raise ValueError(f"model.weights_path {path} left {len(unloaded)} of {len(drawn)} randomly initialised "
                         f"{backbone!r} backbone weights at their init (e.g. {', '.join(unloaded[:3])}): it is not "
                         "weights of this backbone timm can read, nor a PillSnap checkpoint of it")
    LOGGER.info("classifier: %s backbone weights from %s%s (head: %d classes, fresh)", backbone, path,
                " (a PillSnap checkpoint)" if checkpoint is not None else "", num_classes)
    return model


def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _pillsnap_checkpoint(path: Path) -> dict | None:
    """The checkpoint at `path` when it is one of PillSnap's (weights under `model_state`), else None."""
    try:
        ckpt = load_ckpt(path, map_location="cpu", mmap=True)
    except Exception:  # noqa: BLE001 - not a checkpoint load_ckpt reads (safetensors, a bare state dict): timm's
        return None
    return ckpt if isinstance(ckpt, dict) and isinstance(ckpt.get("model_state"), dict) else None


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "classifier"
    names = classifier if isinstance(classifier, (list, tuple)) else (classifier,)
    return tuple(f"{name}." for name in names)


def _load_backbone(model: nn.Module, ckpt: dict, backbone: str, path: Path) -> None:
    """A PillSnap checkpoint's validated weights into `model`, all but the head (another stage's classes)."""
    trained = ((ckpt.get("config_snapshot") or {}).get("model") or {}).get("backbone")
    if trained is not None and trained != backbone:
        raise ValueError(f"model.weights_path {path} is a PillSnap checkpoint of backbone {trained!r}, not "
                         f"{backbone!r}: set model.backbone={trained}, or give weights of {backbone!r}")
    head = _head_prefixes(model)
    state = {k: v for k, v in select_inference_state(ckpt).items() if not k.startswith(head)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    left = [k for k in missing if not k.startswith(head)]
    if left or unexpected:
        raise ValueError(f"model.weights_path {path} does not fit backbone {backbone!r}: missing "
                         f"{left[:3]}, unexpected {unexpected[:3]}")


@contextlib.contextmanager
def _hub_cache_only(on: bool) -> Iterator[None]:
    """huggingface_hub reads its offline switch at call time: set, a cached file still loads and nothing waits."""
    import huggingface_hub.constants as hub

    before = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = before or on
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = before


def _from_hub(backbone: str, num_classes: int) -> nn.Module:
    import huggingface_hub.constants as hub
    import timm

    offline = offline_reason(hub.ENDPOINT)
    try:
        with _hub_cache_only(offline is not None):
            model = timm.create_model(backbone, pretrained=True, num_classes=num_classes)
    except OSError as err:  # offline with nothing cached, or blocked (huggingface_hub raises OSError subclasses)
        reason = offline or f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        LOGGER.warning("classifier: could not fetch pretrained %s weights (%s; none cached): training from random "
                       "init. To use them, run once with network access (they are cached) or download them and set "
                       "model.weights_path.", backbone, reason)
        model = timm.create_model(backbone, pretrained=False, num_classes=num_classes)
        mark_weights(model, f"{RANDOM_UNWANTED}pretrained {backbone} weights could not be fetched ({reason})")
        return model
    LOGGER.info("classifier: pretrained %s weights loaded (head: %d classes, fresh)", backbone, num_classes)
    mark_weights(model, f"pretrained {backbone} (timm)")
    return model


def load_classifier_for_inference(ckpt_path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the classifier stored in a training checkpoint; returns (model.eval(), config_snapshot)."""
    ckpt = load_ckpt(ckpt_path, map_location="cpu")
    snapshot = ckpt["config_snapshot"] or {}
    model_cfg = snapshot.get("model", {})
    if not model_cfg.get("backbone") or int(model_cfg.get("num_classes") or 0) < 1:
        raise ValueError(f"{ckpt_path}: config_snapshot lacks model.backbone / a resolved model.num_classes")
    model = build_classification_model(model_cfg["backbone"], int(model_cfg["num_classes"]))
    model.load_state_dict(select_inference_state(ckpt))
    return model.to(device).eval(), snapshot


class WithFeatures(nn.Module):
    """A timm classifier that answers (logits, pre-logit features): the features are what the "unknown pill"
    rule measures distances on. timm's own split (`forward_head(..., pre_logits=True)`, then the classifier)
    gives the same logits as the plain forward of an eval-mode model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return self.model.get_classifier()(features), features
