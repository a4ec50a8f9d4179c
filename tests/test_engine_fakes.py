"""Small fakes for the engine tests: a learnable colour-coded dataset with the loader contract's batches."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from pillsnap.config import load_config

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 4


class ColourDataset(Dataset):
    """Class k is a noisy image whose channel means encode k: learnable in a few steps by a tiny model."""

    def __init__(self, n_per_class: int, size: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        codes = torch.tensor([[1, -1, 0], [-1, 1, 0], [0, -1, 1], [1, 1, -1]], dtype=torch.float32)
        self.y = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
        noise = torch.randn(len(self.y), 3, size, size, generator=g)
        self.x = noise * 0.5 + codes[self.y][:, :, None, None]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        return self.x[i], int(self.y[i]), f"img_{i}.png"


def collate(items: list) -> tuple[torch.Tensor, torch.Tensor, dict]:
    xs, ys, paths = zip(*items, strict=True)
    info = {"image_path": list(paths), "mapping_code": [f"K-{y:06d}" for y in ys]}
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64), info


def fake_meta() -> dict:
    names = [f"K-{i:06d}" for i in range(NUM_CLASSES)]
    return {"num_classes": NUM_CLASSES, "class_names": names, "class_weights": None, "stage": 1,
            "class_map": {c: {"index": i, "mapping_code": c, "name": f"drug {i}"} for i, c in enumerate(names)}}


def fake_build_loaders(cfg: DictConfig) -> tuple:
    """(cls_train, cls_val, None, None, None, None, meta) at model.image_size, batch train.batch_size."""
    size = int(cfg.model.image_size)
    train = DataLoader(ColourDataset(12, size, seed=1), batch_size=int(cfg.train.batch_size), shuffle=True,
                       drop_last=True, collate_fn=collate, num_workers=0)
    val = DataLoader(ColourDataset(4, size, seed=2), batch_size=8, shuffle=False, collate_fn=collate)
    return train, val, None, None, None, None, fake_meta()


def make_cfg(exp_dir: Path, *overrides: str) -> DictConfig:
    """The repo config shrunk to a CPU-sized run (tiny timm model, 32 px, 2 epochs)."""
    base = [
        f"paths.exp_dir={exp_dir}", "model.backbone=test_efficientnet", "model.image_size=32",
        "train.strategy=classification", "train.epochs=2", "train.batch_size=8", "train.warmup_steps=2",
        "train.step_log_interval=2", "train.oom.cooldown_sec=0", "train.ema.decay=0.9", "train.lr=0.01",
        "dataloader.num_workers=0", "train.early_stopping.patience=50",
    ]
    return load_config(ROOT / "config.yaml", [*base, *overrides], dotenv_path=None)


def test_fake_loaders_follow_the_batch_contract(tmp_path: Path) -> None:
    train, val, *_, meta = fake_build_loaders(make_cfg(tmp_path))
    x, y, info = next(iter(train))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(info) == {"image_path", "mapping_code"}
    assert len(train) == 6 and meta["num_classes"] == NUM_CLASSES
