"""ONNX export of the classifier and the detector (dynamic batch), and onnxruntime models with the torch models'
call shapes.

The ONNX detector returns the same raw head output as the torch one; both go through the one NMS,
pillsnap.models.detector.postprocess_detections, so torch and ONNX figures are comparable. `{exp_dir}/export/`
holds classifier.onnx, detector.onnx, export.json (what the runtime needs: input sizes, class count, the
checksums of the checkpoints they came from) and parity.json (written by `pillsnap export`).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pillsnap.utils.io import file_sha256

LOGGER = logging.getLogger(__name__)
ONNX_INPUT, ONNX_OUTPUT = "images", "output0"
CLASSIFIER_OUTPUTS = ("logits", "features")  # features: what the "unknown pill" rule measures distances on
EXPORT_DIR = "export"
CLASSIFIER_ONNX, DETECTOR_ONNX = "classifier.onnx", "detector.onnx"
EXPORT_META, PARITY_REPORT = "export.json", "parity.json"


def export_onnx(model: nn.Module, out_path: str | Path, image_size: int, output_names: tuple[str, ...] = (ONNX_OUTPUT,),
                opset: int = 17) -> Path:
    """Export an image model ([B, 3, S, S] in; one output, or a tuple named by `output_names`) to ONNX with a
    dynamic batch axis; returns the written path."""
    from pillsnap.utils import atomic_path

    model = model.eval()
    dummy = torch.zeros(1, 3, image_size, image_size, device=next(model.parameters()).device)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp, warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is deprecated in favour of dynamo, which needs onnxscript; it still works.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, dummy, str(tmp), input_names=[ONNX_INPUT], output_names=list(output_names), opset_version=opset,
            dynamo=False, dynamic_axes={name: {0: "batch"} for name in (ONNX_INPUT, *output_names)},
        )
    LOGGER.info("exported %s to %s", type(model).__name__, out_path)
    return out_path


def export_detector_onnx(model: nn.Module, out_path: str | Path, image_size: int, opset: int = 17) -> Path:
    """Export an eval-mode detector (raw head output [B, 4+nc, A]) to ONNX, dynamic batch."""
    return export_onnx(model, out_path, image_size, (ONNX_OUTPUT,), opset)


def export_classifier_onnx(model: nn.Module, out_path: str | Path, image_size: int, opset: int = 17) -> Path:
    """Export an eval-mode timm classifier to ONNX, dynamic batch, with two outputs: logits [B, C] and its
    pre-logit features [B, D]."""
    from pillsnap.models.classifier import WithFeatures

    return export_onnx(WithFeatures(model).eval(), out_path, image_size, CLASSIFIER_OUTPUTS, opset)


def onnx_providers(device: str | torch.device = "cpu") -> list[str]:
    """CUDA first when asked for and available in this onnxruntime build, CPU always as the fallback. Asked for
    CUDA where this onnxruntime has none (the `onnxruntime` wheel is CPU-only; `onnxruntime-gpu` has CUDA), the
    log says the models run on the CPU."""
    import onnxruntime as ort

    cuda = str(device).startswith("cuda")
    if cuda and "CUDAExecutionProvider" not in ort.get_available_providers():
        LOGGER.warning("onnx: %s was asked for, but this onnxruntime has no CUDA provider (%s): the ONNX models "
                       "run on the CPU; install onnxruntime-gpu, or use inference.backend=torch", device,
                       ", ".join(ort.get_available_providers()))
        cuda = False
    return (["CUDAExecutionProvider"] if cuda else []) + ["CPUExecutionProvider"]


class OnnxModel:
    """An onnxruntime session over one exported image model: images in (torch or numpy), the first output out.
    session.run is thread-safe, so one instance serves every API worker."""

    def __init__(self, onnx_path: str | Path, device: str | torch.device = "cpu", kind: str = "model") -> None:
        import onnxruntime as ort

        self.path = Path(onnx_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX {kind} not found: {self.path}; write it with `pillsnap export --exp EXP`")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # onnxruntime's workers spin after each run by default, burning the cores that torch (preprocessing, NMS)
        # and the other requests need next; waiting on a condition costs microseconds instead.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.intra_op_num_threads = torch.get_num_threads()  # one thread budget for both runtimes
        self.session = ort.InferenceSession(str(self.path), options, providers=onnx_providers(device))
        self.providers = self.session.get_providers()  # what it runs on (onnxruntime may drop one it cannot start)
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def image_size(self) -> int:
        """The square input size the graph was traced at."""
        return int(self.session.get_inputs()[0].shape[-1])

    def run(self, images: torch.Tensor | np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
        """The named outputs (default: all) for a batch of images."""
        array: Any = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
        return self.session.run(outputs or self.output_names,
                                {self.input_name: np.ascontiguousarray(array, np.float32)})


class OnnxDetector(OnnxModel):
    """Same call shape as the torch detector: letterboxed images in, raw output (numpy) out."""

    def __init__(self, onnx_path: str | Path, device: str | torch.device = "cpu") -> None:
        super().__init__(onnx_path, device, kind="detector")

    def __call__(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        return self.run(images)[0]


class OnnxClassifier(OnnxModel):
    """Same call shape as the torch classifier wrapped in WithFeatures: normalised crops in, (logits, features)
    out as torch tensors; features are None for an export made before they were an output."""

    def __init__(self, onnx_path: str | Path, device: str | torch.device = "cpu") -> None:
        super().__init__(onnx_path, device, kind="classifier")

    def __call__(self, images: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        outputs = [torch.from_numpy(o) for o in self.run(images)]
        return outputs[0], outputs[1] if len(outputs) > 1 else None


def read_export_meta(export_dir: str | Path, checkpoints: dict[str, Path | None]) -> dict:
    """`{export_dir}/export.json`, checked against the checkpoints it must come from ({"classifier": path,
    "detector": path or None}): a missing or stale export is an error that names `pillsnap export`."""
    from pillsnap.utils import read_json

    export_dir = Path(export_dir)
    meta_path = export_dir / EXPORT_META
    rerun = f"run `pillsnap export --exp {export_dir.parent}` (or set inference.backend=torch)"
    if not meta_path.is_file():
        raise FileNotFoundError(f"inference.backend=onnx needs the ONNX export, but {meta_path} is missing: {rerun}")
    meta = read_json(meta_path)
    for role, ckpt in checkpoints.items():
        if ckpt is None:
            continue
        entry = meta.get(role)
        if not entry or not (export_dir / entry["file"]).is_file():
            raise FileNotFoundError(f"The ONNX export in {export_dir} has no {role} model: {rerun}")
        if entry.get("checkpoint_sha256") != file_sha256(ckpt):
            raise ValueError(f"{export_dir / entry['file']} was exported from another {role} checkpoint than "
                             f"{ckpt} (it has changed since): {rerun}")
    return meta
