"""What each stage must show, kept as data in one place: the Go/No-Go thresholds, the mandatory checks, the
performance targets of stages 1-4, the advisor's limits and the final test's business goals (the design's values,
written with PillSnap's metric paths; docs/DESIGN_MAP.md gives the design's spelling of each and the few places
where PillSnap chose between two design values)."""

from __future__ import annotations

from dataclasses import dataclass

# The device class the design's speed, memory and batch figures were set on (its single 16 GB card). A figure of
# that kind measured on another device is reported as not comparable, never as met or failed.
GPU = "cuda"


@dataclass(frozen=True)
class Target:
    """A performance target: `path` ("section.key" in the results) against `threshold`."""

    path: str
    threshold: float
    higher_is_better: bool = True
    quality: bool = False  # a model-quality figure: one far below target caps the recommendation
    one_class: bool = False  # a per-class floor: at zero it is one class failing, not the model failing to learn
    device: str | None = None  # the device class the threshold holds for (None: any device)

    def ratio(self, value: float) -> float:
        """Achievement in [0, 1]: 1 when met, the share of the target otherwise."""
        if self.higher_is_better:
            return 1.0 if value >= self.threshold else max(value, 0.0) / self.threshold
        return 1.0 if value <= self.threshold else self.threshold / max(value, 1e-12)

    def describe(self, value: float) -> str:
        sign = ">=" if self.higher_is_better else "<="
        return f"{self.path} {value:.4g} (target {sign} {self.threshold:g})"

    def comparable(self, device: str | None) -> bool:
        """Whether a figure measured on `device` ("cpu", "cuda:0"; None: not recorded) can be held to this target."""
        return self.device is None or device is None or device.split(":")[0] == self.device


@dataclass(frozen=True, kw_only=True)
class StageCriteria:
    """The simple gate's thresholds plus the stage's mandatory checks and performance targets."""

    min_accuracy: float  # classification accuracy on the validation split
    max_latency_ms: float  # p95 of the whole pipeline per photo, on `latency_device`
    min_coverage: float  # share of the stage's classes present in the validation split
    min_eval_samples: int  # validation crops evaluated (at most the split's size: see eval/gates.py)
    max_acc_drop: float  # accuracy lost against the stage's previous evaluation
    epsilon_acc: float  # hysteresis: an accuracy this far below min_accuracy still passes
    mandatory_checks: tuple[str, ...]
    targets: tuple[Target, ...]
    latency_device: str = GPU


@dataclass(frozen=True, kw_only=True)
class AdvisorLimits:
    """The advisor's numbers and the limits of the mandatory checks that a run's figures decide."""

    proceed_score: float = 0.7  # mean achievement from which proceeding is recommended
    optimize_score: float = 0.5  # below it: stop and rethink, above it: optimise
    weak_share: float = 0.5  # a quality target below this share of its value caps the recommendation
    suggest_share: float = 0.8  # a model below this share of its target gets that model's suggestions
    gpu_memory_high_gb: float = 14.0  # the design's ceiling on its 16 GB card: above it, suggest a smaller batch
    data_loading_slow_s: float = 3.0  # data wait per step above which the loader is the suspect
    max_oom_recoveries: int = 5  # more OOM recoveries than this in one run is a critical failure
    max_corruption_rate: float = 0.01  # share of unreadable label files above which the data is not trusted
    memory_growth_limit: float = 1.10  # RSS at the last epoch over RSS at epoch 2: above this, memory leaks
    max_class_imbalance: float = 10.0  # largest over smallest training class of the stage
    # below this ratio a shortfall in accuracy is not blamed on imbalance (class weights are not suggested)
    imbalance_worth_weighting: float = 2.0
    max_ram_share: float = 0.9  # peak RSS over this share of the machine's RAM: memory optimisation failed
    multi_batch_size: int = 32  # the global batch a stage-3 run must train with


ADVISOR = AdvisorLimits()

# The final test's goals (single-pill macro-F1, combination-photo mAP@0.5), checked once after stage 4.
BUSINESS_GOALS = {"classification.macro_f1": 0.92, "detection.mAP@0.5": 0.85}


def _quality(path: str, threshold: float) -> Target:
    return Target(path, threshold, quality=True, one_class=".per_class_" in path)


def _at_most(path: str, threshold: float, device: str | None = None) -> Target:
    return Target(path, threshold, higher_is_better=False, device=device)


def _on_gpu(path: str, threshold: float) -> Target:
    return Target(path, threshold, device=GPU)


STAGES: dict[int, StageCriteria] = {
    1: StageCriteria(
        min_accuracy=0.78, max_latency_ms=220, min_coverage=0.20, min_eval_samples=2000, max_acc_drop=0.02,
        epsilon_acc=0.002,
        mandatory_checks=("pipeline_complete", "detection_model_loading", "classification_model_loading",
                          "onnx_conversion_success"),
        targets=(_quality("detection.mAP@0.5", 0.30), _at_most("detection.inference_time_ms", 50, GPU),
                 _quality("classification.acc", 0.40), _at_most("classification.inference_time_ms", 10, GPU),
                 _at_most("system.gpu_memory_gb", 14, GPU), _at_most("system.data_loading_s", 2))),
    2: StageCriteria(
        min_accuracy=0.82, max_latency_ms=220, min_coverage=0.40, min_eval_samples=5000, max_acc_drop=0.02,
        epsilon_acc=0.002,
        mandatory_checks=("auto_batch_tuning_success", "tensorboard_logging", "class_balance_verification",
                          "memory_optimization_working"),
        targets=(_quality("detection.mAP@0.5", 0.50), _quality("detection.mAP@0.5:0.95", 0.35),
                 _quality("detection.precision", 0.45), _quality("detection.recall", 0.40),
                 _quality("classification.acc", 0.60), _quality("classification.macro_f1", 0.55),
                 _quality("classification.top5", 0.80), _on_gpu("optimization.batch_size_achieved", 8),
                 _on_gpu("optimization.throughput_img_s", 100),
                 # The design's advanced metrics: class imbalance, convergence, memory efficiency.
                 _at_most("advanced.class_imbalance_ratio", 10), _at_most("advanced.loss_variance", 0.1),
                 _at_most("advanced.memory_peak_over_avg", 1.5))),
    3: StageCriteria(
        min_accuracy=0.85, max_latency_ms=200, min_coverage=0.70, min_eval_samples=10000, max_acc_drop=0.01,
        epsilon_acc=0.002,
        mandatory_checks=("scalability_test_pass", "multi_batch_processing", "memory_leak_test",
                          "stability_test_pass"),
        # Detection at stage 3 trains on its 5 % of combination photos: the stage's own floor is mAP@0.5 >= 0.30;
        # the stricter detection figures are scored but do not cap the recommendation (see docs/DESIGN_MAP.md).
        targets=(_quality("detection.mAP@0.5", 0.30), Target("detection.mAP@0.5:0.95", 0.50),
                 Target("detection.recall", 0.75), Target("detection.precision", 0.70),
                 _quality("classification.acc", 0.75), _quality("classification.macro_f1", 0.70),
                 _quality("classification.top5", 0.90), _quality("classification.per_class_min_f1", 0.30),
                 _on_gpu("scalability.multi_batch_size", 32), Target("scalability.memory_stable_hours", 12),
                 _at_most("scalability.api_response_time_ms", 100, GPU))),
    4: StageCriteria(
        min_accuracy=0.85, max_latency_ms=200, min_coverage=0.70, min_eval_samples=10000, max_acc_drop=0.01,
        epsilon_acc=0.002,
        mandatory_checks=("full_dataset_processing", "production_api_deployment", "cloudflare_tunnel_setup",
                          "automated_monitoring"),
        targets=(_quality("detection.mAP@0.5", 0.85), _quality("detection.mAP@0.5:0.95", 0.65),
                 _quality("detection.recall", 0.90), _quality("detection.precision", 0.85),
                 _quality("classification.acc", 0.92), _quality("classification.macro_f1", 0.88),
                 _quality("classification.top5", 0.98), _quality("classification.per_class_min_acc", 0.85),
                 _at_most("production.inference_latency_ms", 30, GPU), _on_gpu("production.throughput_img_s", 200),
                 Target("production.api_uptime", 0.999))),
}

# Checks that a training run cannot verify (they concern a deployment): reported as unverified, never as passed.
EXTERNAL_CHECKS = frozenset({"production_api_deployment", "cloudflare_tunnel_setup", "automated_monitoring"})

# Mandatory checks of a time-capped stage 1 that still counts as a success (the design's time-cap rule).
TIME_CAP_CHECKS = ("pipeline_complete", "classification_model_loading")

# Mandatory checks that a run passes only having trained the stage's `min_class_coverage` classes (stage_measure).
CLASS_MINIMUM_CHECKS = frozenset({"scalability_test_pass", "full_dataset_processing"})


def stage_criteria(stage: int) -> StageCriteria:
    if stage not in STAGES:
        raise ValueError(f"Unknown stage {stage}; expected one of {sorted(STAGES)}")
    return STAGES[stage]


def needs_class_minimum(stage: int) -> bool:
    """Whether the stage's gate fails any run that trained fewer than its `min_class_coverage` classes (at stages
    1-2 only a time-capped run needs them)."""
    return bool(CLASS_MINIMUM_CHECKS & set(stage_criteria(stage).mandatory_checks))
