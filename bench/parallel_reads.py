"""The pills of one combination photo read side by side (inference.imprint.parallel_reads) vs one after another,
the pipeline's time per photo in auto mode on the same photos, arms taking turns photo by photo, after a warm-up.

The arms spend the same cores: `--cores` (default: this machine's). The baseline is what this machine did before:
each read on `--cores` ONNX Runtime threads (at most 4), one read at a time. The variant reads `--cores` pills at
once on one thread each. Both must give the same answers (the same reads: the reader is deterministic).

    .venv/bin/python bench/parallel_reads.py --exp runs/demo/exp [--photos 18] [--rounds 3] [--cores 2]
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", required=True, help="a trained experiment with a detector (the demo's)")
    parser.add_argument("--photos", type=int, default=18, help="combination test photos timed")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cores", type=int, default=0, help="cores both arms spend (0: this machine's)")
    args = parser.parse_args()

    import torch

    from pillsnap.config.run import load_run_config
    from pillsnap.data import load_manifest
    from pillsnap.infer.ocr import MAX_THREADS
    from pillsnap.infer.pipeline import Predictor
    from pillsnap.infer.preprocess import load_image
    from pillsnap.utils.devices import usable_cores

    cores = args.cores or usable_cores()
    torch.set_num_threads(cores)
    arms = {"one at a time": (min(MAX_THREADS, cores), 1), "side by side": (1, cores)}
    predictors = {}
    for name, (threads, parallel) in arms.items():
        cfg = load_run_config(args.exp, [f"inference.imprint.threads={threads}",
                                         f"inference.imprint.parallel_reads={parallel}",
                                         "inference.hard_cases.enabled=false"])
        predictors[name] = Predictor(args.exp, cfg, "cpu")
    manifest = load_manifest(predictors["one at a time"].cfg.paths.manifest_dir)
    test = manifest[(manifest["split"] == "test") & (manifest["image_type"] == "combination")]
    paths = sorted(test["image_path"].unique())
    paths = paths[:: max(1, len(paths) // args.photos)][: args.photos]
    images = [load_image(p)[0] for p in paths]
    times: dict[str, list[float]] = {name: [] for name in arms}
    answers: dict[str, list] = {}
    pills = 0
    for round_ in range(args.rounds + 1):  # round 0 warms up (loads the reader and the detector)
        for i, image in enumerate(images):
            order = list(arms) if (i + round_) % 2 else list(arms)[::-1]
            for name in order:
                start = time.perf_counter()
                result = predictors[name].predict(image, mode="auto")
                if round_:
                    times[name].append(time.perf_counter() - start)
                answers.setdefault(name, []).append([(p["mapping_code"], p["probability"]) for p in result["pills"]])
                if name == order[0] and round_ == 1:
                    pills += result["num_pills"]
    base, variant = (statistics.median(times[name]) * 1000 for name in arms)
    same = answers["one at a time"] == answers["side by side"]
    print(f"{len(images)} combination test photos ({pills} pills found), {cores} cores, median over {args.rounds} "
          f"rounds: one read at a time on {arms['one at a time'][0]} threads {base:.0f} ms/photo, {cores} reads side "
          f"by side on 1 thread each {variant:.0f} ms/photo: {base / variant:.2f}x; same answers: {same}")


if __name__ == "__main__":
    main()
