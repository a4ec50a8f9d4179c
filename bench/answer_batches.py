"""The calibration's validation answers (pillsnap.eval.answer_calibration.val_answers: each crop decoded, through the
classifier, its imprint read where inference would read it) one crop at a time (the code before: a forward pass
of one crop, then its read, on one read's threads) vs in batches (this code: ANSWER_BATCH crops a forward pass,
their reads side by side), on the same crops of a trained run's validation split, cut as the calibration cuts
them, arms taking turns over `--rounds` rounds after a warm-up. Both must give the same answers: the same
candidates, reads and scores (the reader is deterministic; a batched forward pass may differ in the last float
bits).

The variant spends the cores as `inference.imprint.parallel_reads` 0 and `threads` 0 do (the machine's cores over
a read's threads), and with `--cores N` N reads at once on one thread each (parallel_reads N, threads 1), as
bench/parallel_reads.py measures for a photo's pills.

    .venv/bin/python bench/answer_batches.py --exp runs/demo/exp [--crops 96] [--rounds 2] [--cores 2]
"""

from __future__ import annotations

import argparse
import statistics
import time


def one_at_a_time(model, dataset, temperatures, class_names, class_map, topk, threads, indices, unknown, sources):
    """The loop before: one crop a forward pass, its read on `threads` ONNX Runtime threads, one after another."""
    import torch

    from pillsnap.eval.answer_calibration import ValAnswer
    from pillsnap.infer.answer import Classified, classifier_candidates
    from pillsnap.infer.evidence import Evidence

    evidence = Evidence(class_map, read_imprints=True, threads=threads, check_unknown=True, parallel=1)
    out = []
    for index in (int(i) for i in indices):
        crop, label = dataset.load_crop(index), int(dataset.labels[index])
        source = None if sources is None else str(sources[index])
        with torch.no_grad():
            logits, feats = model(dataset.transform(crop)[None])
        probs = torch.softmax(logits.float() / temperatures.of(source), -1).cpu().numpy()
        score = unknown.scores(probs, None if feats is None else feats.float().cpu().numpy())[0]
        candidates, reserve = classifier_candidates(probs, topk, class_names, class_map)[0]
        out.append(ValAnswer(Classified(candidates, score, reserve), evidence.read(crop, candidates),
                             class_names[label], source))
    return out


def key(answers) -> list:
    """What must agree between the arms: each crop's candidates (codes, probabilities to 4 places) and its read
    text (the unknown-pill scores are compared apart: a batched forward pass moves the features in the last float
    bits)."""
    return [([(c["mapping_code"], round(c["probability"], 4)) for c in a.classified.topk],
             None if a.read is None else a.read.text) for a in answers]


def score_gap(before, after) -> float:
    """The largest relative difference of the arms' unknown-pill scores."""
    gaps = [abs(a.classified.unknown_score - b.classified.unknown_score) / max(abs(a.classified.unknown_score), 1e-9)
            for a, b in zip(before, after, strict=True) if a.classified.unknown_score is not None]
    return max(gaps, default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", required=True, help="a trained experiment (the demo's)")
    parser.add_argument("--crops", type=int, default=96, help="validation crops answered per arm and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cores", type=int, default=0,
                        help="reads side by side on one thread each (0: the defaults, the cores over a read's threads)")
    args = parser.parse_args()

    import torch

    from pillsnap.config.run import load_run_config
    from pillsnap.data import build_dataloaders_twostage
    from pillsnap.eval.answer_calibration import spread_sample, val_answers
    from pillsnap.eval.box_calibration import detector_boxes, detector_of
    from pillsnap.eval.calibration import inference_crops, load_manifest_if_any
    from pillsnap.eval.unknown_calibration import crop_sources
    from pillsnap.infer.artefacts import Temperatures, load_calibration, load_unknown_rule
    from pillsnap.infer.ocr import read_threads
    from pillsnap.infer.unknown import UnknownAnswer
    from pillsnap.models.classifier import WithFeatures, load_classifier_for_inference
    from pillsnap.utils.devices import usable_cores

    cfg = load_run_config(args.exp, [])
    loaders = build_dataloaders_twostage(cfg)
    model = WithFeatures(load_classifier_for_inference(f"{args.exp}/checkpoints/classification_best.pt",
                                                      torch.device("cpu"))[0]).eval()
    sources = crop_sources(loaders.cls_val.dataset, load_manifest_if_any(cfg))
    detect = detector_of(cfg, args.exp, torch.device("cpu"))
    detected, _ = detector_boxes(detect, loaders.cls_val.dataset, sources, float(cfg.inference.conf_threshold))
    crops = inference_crops(loaders.cls_val.dataset, sources, cfg, detected)
    ckpts = f"{args.exp}/checkpoints"
    calibration = load_calibration(ckpts, f"{ckpts}/classification_best.pt")
    temperatures, rule = Temperatures.from_stored(calibration), str(cfg.inference.unknown_rule)
    unknown = UnknownAnswer(rule, *load_unknown_rule(ckpts, calibration, rule))
    meta = loaders.meta
    names, class_map, topk = list(meta["class_names"]), dict(meta["class_map"]), int(cfg.inference.topk)
    indices = spread_sample(len(crops), args.crops, 0, sources)
    threads, parallel = (1, args.cores) if args.cores else (0, 0)
    before_threads = read_threads(0)  # the loop before: one read at a time on the defaults' threads
    arms = {
        "one at a time": lambda: one_at_a_time(model, crops, temperatures, names, class_map, topk, before_threads,
                                               indices, unknown, sources),
        "batches": lambda: val_answers(model, crops, temperatures, names, class_map, topk, threads, indices, True,
                                       unknown, sources, check_unknown=True, parallel=parallel),
    }
    times: dict[str, list[float]] = {name: [] for name in arms}
    keys: dict[str, list] = {}
    last: dict[str, list] = {}
    for round_ in range(args.rounds + 1):  # round 0 warms up (loads the reader)
        for name in (list(arms) if round_ % 2 else list(arms)[::-1]):
            start = time.perf_counter()
            answers = arms[name]()
            if round_:
                times[name].append(time.perf_counter() - start)
            keys[name], last[name] = key(answers), answers
    base, variant = (statistics.median(times[name]) for name in arms)
    reads = sum(k[1] is not None for k in keys["batches"])
    same = keys["one at a time"] == keys["batches"]
    spend = f"{args.cores} reads side by side on 1 thread each" if args.cores else \
        f"the defaults ({max(1, usable_cores() // read_threads(0))} read(s) at once on {read_threads(0)} threads)"
    print(f"{len(indices)} validation crops ({reads} read), {usable_cores()} cores, median of {args.rounds} rounds: "
          f"one crop at a time {1000 * base / len(indices):.0f} ms/crop, batches of crops with {spend} "
          f"{1000 * variant / len(indices):.0f} ms/crop: {base / variant:.2f}x; same candidates and reads: {same}, "
          f"unknown-pill scores within {score_gap(last['one at a time'], last['batches']):.1e} (relative)")
    if not same:
        diff = [i for i, (a, b) in enumerate(zip(keys["one at a time"], keys["batches"], strict=True)) if a != b]
        print(f"  differ at {len(diff)} crops, e.g. {keys['one at a time'][diff[0]]} vs {keys['batches'][diff[0]]}")


if __name__ == "__main__":
    main()
