"""The same checkpoints evaluated twice, once as the machine is and once with every core kept busy by other
processes: the stage decision must not change with the load (its latency figures may).

    python bench/stage_decision_repeat.py --exp runs/demo/exp --stage 1 [--busy 4]

The first evaluation is the baseline, measured in the same run; the report of the run is left as the second
evaluation wrote it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time


def spin(stop: float) -> None:
    while time.time() < stop:
        pass


def evaluate(exp: str, stage: int) -> dict:
    from pillsnap.config.run import load_run_config
    from pillsnap.eval.stage_eval import evaluate_stage

    cfg = load_run_config(exp, [f"data.progressive_validation.current_stage={stage}"], required=("manifest_dir",))
    start = time.perf_counter()
    decision = evaluate_stage(cfg, exp, assume_yes=True)
    results = decision["results"]
    return {"status": decision["status"], "recommendation": decision["recommendation"],
            "action": decision.get("action"), "score": decision["advisor"]["performance_score"],
            "classifier_ms": results["classification"].get("inference_time_ms"),
            "pipeline_p95_ms": results.get("latency_p95_ms"), "load": os.getloadavg()[0],
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exp", required=True)
    parser.add_argument("--stage", type=int, default=1)
    parser.add_argument("--busy", type=int, default=2 * (os.cpu_count() or 1),
                        help="busy-loop processes during the second evaluation")
    args = parser.parse_args()
    first = evaluate(args.exp, args.stage)
    spinners = [mp.Process(target=spin, args=(time.time() + 3600,), daemon=True) for _ in range(args.busy)]
    for p in spinners:
        p.start()
    try:
        second = evaluate(args.exp, args.stage)
    finally:
        for p in spinners:
            p.terminate()
    for name, row in (("as is (baseline)", first), (f"+{args.busy} busy processes", second)):
        print(f"{name:>22}: {row['status']} ({row['recommendation']}) score {row['score']:.3f}, classifier "
              f"{row['classifier_ms']} ms, pipeline p95 {row['pipeline_p95_ms']} ms, load {row['load']:.1f}, "
              f"{row['seconds']:.0f} s")
    ratio = (second["pipeline_p95_ms"] or 0) / max(first["pipeline_p95_ms"] or 1e-9, 1e-9)
    same = all(first[k] == second[k] for k in ("status", "recommendation", "action"))
    print(f"pipeline p95 under load: {ratio:.2f}x the baseline; same decision and next step: {same}")


if __name__ == "__main__":
    main()
