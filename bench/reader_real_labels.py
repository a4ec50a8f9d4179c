"""The imprint reader on pill crops drawn from REAL label fields: the reader of git HEAD against the working
tree's, on the same crops in the same run.

The label JSONs under ../shared/spec/aihub_real_labels (real AI Hub combination labels, read at run time, never
copied) give each pill's imprints as the real data writes them ("마크213", "I분할선Y", "TYLENOLER"), its shape,
size in mm, colours and form. Each readable side is drawn by the generator's own pill renderer (debossed, or
printed on a capsule) in its label colour and two other common ones, at several azimuths, camera elevations and
real crop sizes (170-500 px), and cut at its box like the real crops. Per crop: a blind read (exact after
normalisation) and a read given three candidate imprints (the truth and two others of the real labels; right when
the reader's own pick, `matched`, is the truth, under each version's own rule: the text's best fit before
the candidates' likelihoods, by them where the text is like none since; beside it the same reads scored by the text
alone, right when the truth is the read's unique best match above the similarity floor), and the time
per read. For the working tree's reader also the answer policy's pick among the crop's three drugs (each with both
sides as labelled, given to the reader as inference gives them, at equal classifier probabilities): by the read
text alone and with the candidates' likelihoods (RerankWeights.likelihood).

    .venv/bin/python bench/reader_real_labels.py [--variants 3 --threads 1 --seed 0 --labels DIR]
        [--baseline-ref HEAD] [--show-misses]
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from PIL import Image

from pillsnap.data.synth import SHADES
from pillsnap.data.synth_pill import PillLook
from pillsnap.data.synth_render import PhotoConditions, render_photo
from pillsnap.infer.matching import candidate_imprints, class_imprint_similarity, normalize_imprint
from pillsnap.infer.ranking import rerank
from pillsnap.infer.thresholds import THRESHOLDS

REPO = Path(__file__).resolve().parents[1]
LABELS = REPO.parent / "shared" / "spec" / "aihub_real_labels"
OTHER_COLORS = ("하양", "노랑", "분홍")  # the commonest real colours: each pill is also drawn in two of them
ELEVATIONS = (70, 75, 90)  # the real combination photos' camera elevations
SCALES = (0.9, 1.0, 1.2)  # around the real resolution: crops of 170-500 px


@dataclass
class Crop:
    image: Image.Image
    truth: str  # the label text of the side facing the camera
    others: tuple[str, ...]  # two other real imprints: the wrong candidates
    drugs: tuple[dict, ...] = ()  # the drugs (both sides, as labelled) of the truth and the others, in that order


def real_labels(folder: Path) -> list[dict]:
    """images[0] of every real label with imprint fields, one per drug code."""
    out: dict[str, dict] = {}
    for path in sorted(folder.rglob("*.json")):
        image = json.loads(path.read_text(encoding="utf-8"))["images"][0]
        if image.get("print_front") is not None and image.get("drug_shape"):
            out.setdefault(image["dl_mapping_code"], image)
    return list(out.values())


def look_of(label: dict, color: str, rng: random.Random) -> PillLook:
    """The generator's pill look for a real label, in `color`."""
    form = label.get("form_code_name") or ""
    capsule = "soft" if "연질캡슐" in form else ("hard" if "경질캡슐" in form else "")
    colors = (color,) + ((label["color_class2"],) if label.get("color_class2") in SHADES else ())
    return PillLook(
        shape=label["drug_shape"], capsule=capsule, colors=colors, rgb=tuple(rng.choice(SHADES[c]) for c in colors),
        print_front=label.get("print_front") or "", print_back=label.get("print_back") or "", logo=rng.randrange(8),
        line_front=label.get("line_front") or "", line_back=label.get("line_back") or "", ink=bool(capsule),
        gloss={"soft": 1.0, "hard": 0.6}.get(capsule, 0.1 if form == "나정" else 0.35),
        long_mm=float(label["leng_long"]), short_mm=float(label["leng_short"]), base_angle=0.0)


def make_crops(labels: list[dict], variants: int, seed: int) -> list[Crop]:
    rng = random.Random(seed)
    sides = [(label, back) for label in labels for back in (False, True)
             if normalize_imprint(label.get("print_back" if back else "print_front"))]
    texts = sorted({label.get("print_back" if back else "print_front") for label, back in sides})
    drug_of = {label.get("print_back" if back else "print_front"): {
        "print_front": label.get("print_front") or "", "print_back": label.get("print_back") or ""}
        for label, back in sides}
    crops = []
    for label, back in sides:
        truth = label["print_back" if back else "print_front"]
        colors = [label["color_class1"]] + rng.sample([c for c in OTHER_COLORS if c != label["color_class1"]], 2)
        for color in colors:
            for k in range(variants):
                cond = PhotoConditions("1" if back else "0", "2", rng.choice("12"), rng.choice(ELEVATIONS),
                                       (k * 360 // variants + rng.randrange(0, 360 // variants)) % 360)
                look = look_of(label, color if color in SHADES else "하양", rng)
                png, boxes, _ = render_photo([look], cond, rng.choice(SCALES), seed=rng.getrandbits(32))
                x, y, w, h = boxes[0]
                image = Image.open(io.BytesIO(png)).convert("RGB").crop((x, y, x + w, y + h))
                others = tuple(rng.sample([t for t in texts if normalize_imprint(t) != normalize_imprint(truth)], 2))
                crops.append(Crop(image, truth, others, tuple(drug_of[t] for t in (truth, *others))))
    return crops


HEAD_MODULES = ("matching", "ocr", "imprint_geometry", "imprint")  # the reader's modules, each after those it uses


def head_reader_modules(ref: str = "HEAD") -> dict[str, ModuleType]:
    """The reader's modules as they are at git `ref` ({name: module}; before the split the OCR and the geometry
    lived in imprint.py, so only the modules that exist there), loaded as temporary `_head_*` modules that import
    each other, never the working tree's. A ref git does not know stops the bench with one line saying so."""
    if subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd=REPO,
                      capture_output=True).returncode:
        raise SystemExit(f"--baseline-ref {ref!r}: not a commit of this repository")
    for stale in [name for name in sys.modules if name.startswith("_head_")]:
        del sys.modules[stale]  # a ref loaded before: its modules must not stand in for this one's
    modules: dict[str, ModuleType] = {}
    for name in HEAD_MODULES:
        path = f"{ref}:pillsnap/infer/{name}.py"
        there = subprocess.run(["git", "cat-file", "-e", path], cwd=REPO, capture_output=True).returncode == 0
        if not there and name in ("ocr", "imprint_geometry"):
            continue
        source = subprocess.run(["git", "show", path], cwd=REPO, check=True, capture_output=True, text=True).stdout
        for loaded in modules:
            source = source.replace(f"from pillsnap.infer.{loaded} import", f"from _head_{loaded} import")
        left = [m for m in HEAD_MODULES if m in modules and f"from pillsnap.infer.{m} import" in source]
        assert not left, f"{path} imports {left} in a way the loader does not rewrite"
        spec = importlib.util.spec_from_loader(f"_head_{name}", loader=None)
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"_head_{name}"] = module
        exec(compile(source, path, "exec"), module.__dict__)  # noqa: S102
        modules[name] = module
    return modules


def _right(read: str, truth: str, candidates: list[str], similarity: Callable = class_imprint_similarity) -> bool:
    """The truth is the unique best match of the read, above the floor, under `similarity` (each version's own
    matching: the answer policy picks the candidate its matching ranks first)."""
    sims = [similarity(read, {"print_front": c}) for c in candidates]
    best = max(sims)
    return best > THRESHOLDS.imprint_floor and sims.count(best) == 1 and sims[candidates.index(truth)] == best


def _picked(read: object, truth: str) -> bool:
    """The reader's own pick (`matched`, each version's own rule) is the truth."""
    return read.matched is not None and normalize_imprint(read.matched) == normalize_imprint(truth)


def policy_picks(reader: object, crop: Crop) -> tuple[bool, bool]:
    """Whether the answer policy ranks the right drug first among the crop's three drugs (equal classifier
    probabilities, the reader given both sides of each as inference gives them): by the read text alone, and with
    the candidates' likelihoods too."""
    class_map = {f"D{i}": drug for i, drug in enumerate(crop.drugs)}
    candidates = [{"mapping_code": code, "probability": 1 / 3} for code in class_map]
    read = reader.read(crop.image, candidate_imprints(candidates, class_map))
    out = []
    for likelihoods in (None, read.likelihoods):
        top = rerank(candidates, class_map, read.text, read.score, likelihoods=likelihoods,
                     read_likelihood=read.read_likelihood).candidates
        out.append(top[0]["mapping_code"] == "D0" and top[0]["probability"] > top[1]["probability"])
    return out[0], out[1]


def measure(reader: object, crops: list[Crop], similarity: Callable = class_imprint_similarity,
            policy: bool = False) -> dict:
    exact = right = by_read_text = by_text = by_likelihood = 0
    seconds: list[float] = []
    misses, misses3 = [], []
    for crop in crops:
        start = time.perf_counter()
        blind = reader.read(crop.image)
        candidates = [crop.truth, *crop.others]
        given = reader.read(crop.image, candidates)
        seconds.append((time.perf_counter() - start) / 2)
        ok = normalize_imprint(blind.text) == normalize_imprint(crop.truth)
        exact += ok
        picked = _picked(given, crop.truth)
        right += picked
        by_read_text += _right(given.text, crop.truth, candidates, similarity)
        if not ok:
            misses.append(f"{normalize_imprint(crop.truth)}:{blind.text!r}")
        if not picked:
            misses3.append(f"{normalize_imprint(crop.truth)}:{given.text!r}({'/'.join(crop.others)})")
        if policy:
            text_only, with_likelihoods = policy_picks(reader, crop)
            by_text += text_only
            by_likelihood += with_likelihoods
    return {"exact": exact, "right3": right, "right3_text": by_read_text, "n": len(crops),
            "ms": 1000 * statistics.median(seconds), "misses": misses, "misses3": misses3,
            "policy": (by_text, by_likelihood) if policy else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=Path, default=LABELS)
    parser.add_argument("--variants", type=int, default=3, help="azimuth / size / elevation draws per side and colour")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (1: less noise on a shared host)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show-misses", action="store_true")
    parser.add_argument("--baseline-ref", default="HEAD", help="git revision of the 'before' reader and matching")
    args = parser.parse_args()
    if not args.labels.is_dir():
        print(f"skipped: no real labels at {args.labels} (they are kept outside the project)")
        return
    labels = real_labels(args.labels)
    crops = make_crops(labels, args.variants, args.seed)
    sizes = sorted(max(c.image.size) for c in crops)
    print(f"{len(crops)} crops from {len(labels)} real labels, long side {sizes[0]}-{sizes[-1]} px")
    from pillsnap.infer import imprint

    head_modules = head_reader_modules(args.baseline_ref)
    head = head_modules["imprint"]
    label = f"before ({args.baseline_ref})"
    readers = {label: head.ImprintReader(head.ReaderSettings(threads=args.threads)),
               "after": imprint.ImprintReader(imprint.ReaderSettings(threads=args.threads))}
    results = {}
    similarity = {label: head_modules["matching"].class_imprint_similarity,
                  "after": class_imprint_similarity}
    for name, reader in readers.items():
        reader.read(crops[0].image)  # loads the OCR models
        results[name] = measure(reader, crops, similarity[name], policy=name == "after")
    before, after = results[label], results["after"]
    for name, r in results.items():
        print(f"{name:<{len(label)}} exact blind {r['exact']:3d}/{r['n']} = {r['exact'] / r['n']:.3f}   right among 3 "
              f"{r['right3']:3d}/{r['n']} = {r['right3'] / r['n']:.3f} "
              f"(by the read text alone {r['right3_text']:3d})   "
              f"{r['ms']:.0f} ms per read (median)")
        if args.show_misses:
            print("   blind misses:", " ".join(r["misses"]))
            print("   misses among 3 (truth:read(others)):", " ".join(r["misses3"]))
    print(f"ratio after/before: exact {after['exact'] / max(1, before['exact']):.2f}x, right among 3 "
          f"{after['right3'] / max(1, before['right3']):.2f}x, time per read {after['ms'] / before['ms']:.2f}x")
    text_only, with_likelihoods = after["policy"]
    n = after["n"]
    print(f"answer policy, right drug first among the crop's 3 drugs (both sides given; equal look): read text "
          f"alone {text_only}/{n} = {text_only / n:.3f}, with the candidates' likelihoods {with_likelihoods}/{n} = "
          f"{with_likelihoods / n:.3f} ({with_likelihoods / max(1, text_only):.2f}x)")


if __name__ == "__main__":
    main()
