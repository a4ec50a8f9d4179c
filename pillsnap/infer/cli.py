"""`pillsnap predict IMAGE... --exp EXP_DIR [--mode auto] [--json]`: the two-stage pipeline from the command line.

An IMAGE may be a folder: its photos (and those of its subfolders) are answered in name order. Each answer is
printed as soon as it is made (with --json, as one element of the JSON list), so an interrupted run keeps what it
answered; a photo that cannot be answered gets its own error entry and the others go on."""

from __future__ import annotations

import argparse
import json
import logging
import signal
from typing import Any

from pillsnap.infer.gating import INFERENCE_MODES  # pure Python, so `pillsnap --help` stays torch-free
from pillsnap.utils.signals import held_signals

LOGGER = logging.getLogger("pillsnap.predict")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="identify the pills in photos", description=__doc__)
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help="image paths, folders of photos, or zip:<zip>!<member>")
    parser.add_argument("--exp", default=None, help="experiment dir with checkpoints/ (default: paths.exp_dir)")
    parser.add_argument("--mode", choices=INFERENCE_MODES, default=None,
                        help=f"{' | '.join(INFERENCE_MODES)} (default: inference.mode)")
    parser.add_argument("--conf", type=float, default=None,
                        help="detector confidence (default: inference.conf_threshold)")
    parser.add_argument("--imprint", default=None, help="hint: the text printed or engraved on the pill (either side)")
    parser.add_argument("--color", default=None, help="hint: the pill's colour(s), e.g. white or 하양, 'white, red'")
    parser.add_argument("--shape", default=None, help="hint: the pill's shape, e.g. round, oval, 원형")
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per image")
    parser.add_argument("--cfg", default=None, help="config file (default: EXP/config.yaml, else ./config.yaml)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted config override, repeatable (e.g. --set inference.topk=3)")
    parser.set_defaults(func=run)


def format_result(result: dict) -> str:
    """Human-readable lines for one prediction."""
    conf = result["single_confidence"]
    head = (f"{result['image']}: mode_used={result['mode_used']} pills={result['num_pills']} "
            f"single_conf={'-' if conf is None else probability_text(conf)} "
            f"fallback={result['fallback_reason'] or '-'}")
    lines = [head]
    for i, pill in enumerate(result["pills"], start=1):
        lines.append(f"  #{i} {answer_text(pill)} bbox={pill['bbox']}")
        lines += [f"     {note}" for note in _notes(pill)]
    return "\n".join(lines)


def probability_text(p: float) -> str:
    """Three decimals, never "1.000" nor "0.000": a probability that rounds to either is said as beyond it."""
    return ">0.999" if p >= 0.9995 else "<0.001" if p < 0.0005 else f"{p:.3f}"


def answer_text(pill: dict) -> str:
    """One pill's answer in words: the drug and its probability, or "unknown pill" (or "maybe no pill", a box the
    detector doubts) with the nearest known drugs."""
    if pill.get("unknown"):
        nearest = ", ".join(c["mapping_code"] for c in pill["topk"][:3])
        what = "maybe no pill" if pill.get("unknown_by") == "box" else "unknown pill"
        return f"{what} (nearest known: {nearest})"
    p = pill["probability"]
    text = f"{pill['mapping_code']} {pill['name']} p={probability_text(p)}"
    if pill.get("sure") is not None:  # a calibrated prediction set: sure, or how many drugs are left open
        level = f"{pill['set_coverage']:.0%}"
        size = len(pill["prediction_set"])
        text += f" [sure at {level}]" if pill["sure"] else f" [not sure at {level}]" if size == 1 else \
            f" [one of {size} at {level}]"
    return text


def _notes(pill: dict) -> list[str]:
    """What a person should know about one answer, one line each."""
    why = "why no name" if pill.get("unknown_by") == "box" else "why unknown"
    notes = [f"{why}: {pill['unknown_reason']}"] if pill.get("unknown") else []
    if pill.get("set_note"):
        notes.append(f"set: {pill['set_note']}")
    if pill.get("imprint_read") is not None:
        changed = " (it changed the answer)" if pill.get("ranking_changed") else ""
        read = repr(pill["imprint_read"]) if pill["imprint_read"] else "nothing legible"
        notes.append(f"imprint read: {read}{changed}")
        recalled = [c["mapping_code"] for c in pill.get("topk") or () if c.get("recalled_by_imprint")]
        if recalled:
            notes.append(f"brought back by its imprint from below the top candidates: {', '.join(recalled)}")
    # a sure set has settled it; a set of several says what would settle it (set_note): said once
    if pill.get("imprint_unresolved") and pill.get("sure") is None:
        notes.append("look-alike drugs differ only by their imprint, and what was read here matches none of them: "
                     "photograph the other side, or give the imprint with --imprint")
    if pill.get("hints_conflict"):
        notes.append(f"this answer contradicts your hint ({', '.join(pill['conflicts'])})")
    return notes


def load_photo(path: str, limits: Any) -> Any:
    """The photo at `path` through the shared decoder (size limits, EXIF orientation, every PIL mode)."""
    from pathlib import Path

    from pillsnap.utils.images import read_image

    if not path.startswith("zip:") and not Path(path).is_file():
        raise FileNotFoundError(f"Image not found: {path}")
    return read_image(path, limits)


def _is_folder(path: str) -> bool:
    from pathlib import Path

    return not path.startswith("zip:") and Path(path).is_dir()


def photo_paths(paths: list[str]) -> list[str]:
    """The photos to answer: each path as given, a folder replaced by its photos (PHOTO_SUFFIXES, subfolders and
    symlinked subfolders too, each real folder once, in name order; hidden files and folders such as macOS's
    `._IMG.JPG` left out). A folder with none stays as given, so that it is answered with an error naming it."""
    out: list[str] = []
    for path in paths:
        if _is_folder(path):
            out += _photos_under(path) or [path]
        else:
            out.append(path)
    return out


def _photos_under(folder: str) -> list[str]:
    import os

    from pillsnap.utils.images import PHOTO_SUFFIXES

    found, seen = [], set()
    for here, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:  # a link back up the tree, or a second link to one folder
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # name order: the first link to a folder wins
        found += [os.path.join(here, f) for f in files if not f.startswith(".")
                  and os.path.splitext(f)[1].lower() in PHOTO_SUFFIXES and os.path.isfile(os.path.join(here, f))]
    return sorted(found)


def predict_one(predictor: Any, path: str, args: argparse.Namespace, limits: Any, hints: Any = None) -> dict:
    """One photo's result, or its own error entry: a bad file, or a photo the device has no memory for, never costs
    the other files their answers (any other failure of the models is a fault, and stops the run)."""
    from torch import OutOfMemoryError

    from pillsnap.utils.images import PHOTO_SUFFIXES

    try:
        if _is_folder(path):  # photo_paths left it: it holds no photo
            raise FileNotFoundError(f"no photos ({', '.join(PHOTO_SUFFIXES)}) in folder {path}")
        image = load_photo(path, limits)
        return predictor.predict(image, mode=args.mode, conf_threshold=args.conf, name=path, hints=hints)
    except (ValueError, OSError, OutOfMemoryError) as err:  # OSError: a missing file and every decoder ImageError
        LOGGER.error("predict: %s: %s", path, err)
        return {"image": path, "error": str(err), "error_type": type(err).__name__, "mode_used": None, "pills": []}


class Printer:
    """Each result printed as soon as it is made: text blocks, or the elements of one JSON list (closed by
    `close`, also after an interrupt, so what was printed stays valid JSON)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json, self.count = as_json, 0

    def add(self, result: dict) -> None:
        with held_signals((signal.SIGINT,)):  # Ctrl-C lands after the element, never inside it
            if self.as_json:
                body = json.dumps(result, ensure_ascii=False, indent=2).replace("\n", "\n  ")
                print(("[\n  " if not self.count else ",\n  ") + body, end="", flush=True)
            else:
                print(format_result(result) if "error" not in result else f"{result['image']}: ERROR "
                      f"{result['error']}", flush=True)
            self.count += 1

    def close(self) -> None:
        if self.as_json:
            print("[]" if not self.count else "\n]", flush=True)


def run(args: argparse.Namespace) -> int:
    from pillsnap.config import ConfigError, load_cli_config
    from pillsnap.infer.matching import Hints
    from pillsnap.infer.pipeline import Predictor
    from pillsnap.utils.images import ImageLimits

    try:
        hints = Hints.parse(args.imprint, args.color, args.shape)
        cfg = load_cli_config(args.exp, args.cfg, args.overrides)
        predictor = Predictor(cfg.paths.exp_dir, cfg, args.device)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        LOGGER.error("predict: %s", err)
        return 2
    from tqdm import tqdm

    limits = ImageLimits(int(cfg.serving.max_image_pixels), int(cfg.serving.min_image_side))
    paths = photo_paths(args.images)
    printer, failed = Printer(args.json), 0
    try:
        # a progress bar on stderr when there are several photos and a terminal to show it on
        for path in tqdm(paths, desc="predict", unit="photo", disable=None if len(paths) > 1 else True,
                         leave=False):
            result = predict_one(predictor, path, args, limits, None if hints.empty() else hints)
            failed += "error" in result
            printer.add(result)
    except KeyboardInterrupt:
        printer.close()
        LOGGER.error("predict: interrupted after %d of %d photos (their answers are above)", printer.count,
                     len(paths))
        return 130
    except BaseException:  # a fault of the models: the answers printed so far stay readable
        printer.close()
        raise
    printer.close()
    return 1 if failed else 0
