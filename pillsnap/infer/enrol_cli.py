"""`pillsnap enrol --exp EXP --code K-XXXXXX --name NAME PHOTO...`: teach a trained model a new drug from 3 to 10
photos, without retraining; `--list` shows the enrolled drugs and `--remove CODE` takes one out. A server running on
the experiment answers the change on its next photo."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

LOGGER = logging.getLogger("pillsnap.enrol")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("enrol", help="add a new drug from a few photos (no retraining); --list, --remove",
                                   description=__doc__)
    parser.add_argument("photos", nargs="*", metavar="PHOTO",
                        help="3 to 10 photos of the drug: single-pill photos, or combination photos (the pill least "
                             "like any known drug is taken)")
    parser.add_argument("--exp", default=None, help="experiment dir with checkpoints/ (default: paths.exp_dir)")
    parser.add_argument("--code", default=None, help="the drug's code, K- and 6 digits")
    parser.add_argument("--name", default=None, help="the drug's name as answers show it")
    parser.add_argument("--imprint-front", default=None, help="text printed or engraved on the front")
    parser.add_argument("--imprint-back", default=None, help="text printed or engraved on the back")
    parser.add_argument("--color", default=None, help="colour(s), e.g. white or 하양, 'white, red'")
    parser.add_argument("--shape", default=None, help="shape, e.g. round, oval, 원형")
    parser.add_argument("--replace", action="store_true", help="enrol again a drug that is already enrolled")
    parser.add_argument("--force", action="store_true",
                        help="enrol although the photos look like an existing drug, or it would take answers from "
                             "the trained drugs (more than the check allows)")
    parser.add_argument("--list", action="store_true", help="list the enrolled drugs")
    parser.add_argument("--remove", default=None, metavar="CODE", help="remove an enrolled drug")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--cfg", default=None, help="config file (default: EXP/config.yaml, else ./config.yaml)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the combination of arguments, or None."""
    actions = sum([bool(args.list), args.remove is not None, bool(args.code or args.photos)])
    if actions != 1:
        return "give exactly one of: --list, --remove CODE, or --code K-XXXXXX --name NAME PHOTO..."
    if (args.code or args.photos) and not (args.code and args.name):
        return "enrolling needs --code and --name"
    return None


def _load_photos(paths: list[str], cfg: Any) -> list[Any]:
    """Each photo through the shared decoder (size limits, EXIF orientation); a bad one is an EnrolmentError."""
    from pillsnap.infer.cli import load_photo
    from pillsnap.infer.enrol import Photo
    from pillsnap.infer.enrolment import EnrolmentError
    from pillsnap.utils.images import ImageLimits

    limits = ImageLimits(int(cfg.serving.max_image_pixels), int(cfg.serving.min_image_side))
    photos = []
    for path in paths:
        try:
            photos.append(Photo(load_photo(path, limits), path))
        except FileNotFoundError as err:
            raise EnrolmentError(f"photo {path}: no such file", "bad_photo") from err
        except (OSError, ValueError) as err:
            raise EnrolmentError(f"photo {path} cannot be read as an image ({err})", "bad_photo") from err
    return photos


def _show(result: dict, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    elif "drugs" in result:
        if result.get("stale"):
            print(f"STALE: {result['stale']}")
        for drug in result["drugs"]:
            imprints = "/".join(x for x in (drug["print_front"], drug["print_back"]) if x) or "-"
            colours = ",".join(drug["colors"]) or "-"
            print(f"{drug['mapping_code']}  {drug['name']}  imprint={imprints} colours={colours}"
                  f" shape={drug['shape'] or '-'} photos={drug['n_photos']} enrolled={drug['enrolled_at']}")
        print(f"{len(result['drugs'])} enrolled drug(s)")
    elif "removed" in result:
        print(f"removed {result['removed']} ({result['name']})")
    else:
        note = " (replaced)" if result["replaced"] else ""
        print(f"enrolled {result['mapping_code']} {result['name']} from {result['n_photos']} photos{note} in "
              f"{result['elapsed_s']:.1f} s")
        if result["look_alike"]:
            found = result["look_alike"]
            print(f"  note: enrolled with --force although it looks like {found['mapping_code']} ({found['name']})")
        takes = result.get("takes_known") or {}
        if takes.get("crops"):
            print(f"  note: it takes {takes['crops']} of the {takes['of']} validation pills the trained drugs answer "
                  f"right ({takes['share']:.1%}), {takes['drug_crops']} of {takes['drug_of']} of "
                  f"{takes['mapping_code']} ({takes['name']})")


def _act(args: argparse.Namespace, cfg: Any) -> dict:
    from pillsnap.infer import enrol as enrolling

    if args.list:
        return enrolling.listing(cfg.paths.exp_dir)
    if args.remove is not None:
        return enrolling.remove(cfg.paths.exp_dir, args.remove.strip())
    info = enrolling.DrugInfo.parse(args.code, args.name, args.imprint_front, args.imprint_back, args.color,
                                    args.shape)
    enrolling.check_photo_count(len(args.photos))  # before any photo is decoded or a model loads
    photos = _load_photos(args.photos, cfg)
    from pillsnap.infer.pipeline import Predictor

    cfg.inference.imprint.enabled = False  # enrolling reads no imprint: the reader need not load
    predictor = Predictor(cfg.paths.exp_dir, cfg, args.device, sets=False)  # it answers nobody: no sets
    return enrolling.enrol(predictor, info, photos, replace=args.replace, force=args.force)


def run(args: argparse.Namespace) -> int:
    from pillsnap.config import ConfigError, load_cli_config
    from pillsnap.infer.enrolment import EnrolmentError

    problem = _check_args(args)
    if problem:
        LOGGER.error("enrol: %s", problem)
        return 2
    try:
        cfg = load_cli_config(args.exp, args.cfg, [])
        result = _act(args, cfg)
    except (ConfigError, FileNotFoundError, EnrolmentError) as err:
        LOGGER.error("enrol: %s", err)
        return 2
    _show(result, args)
    return 0
