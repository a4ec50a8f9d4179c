"""What an enrolment costs with many drugs enrolled before it: `taken_from_trained` (the check that a new drug does
not take the trained drugs' answers), now (the new drug's distances alone) vs before (every enrolled drug's
distances over the whole probe, then the new drug's column kept), same inputs, same run.

Synthetic and sized as a real Stage 4 calibration: 5,000 trained drugs in 1,280 whitened feature dimensions, a probe
of 5 crops a drug, and `--enrolled` drugs enrolled before the new one. The server runs enrolments on the workers that
answer predictions, so this time is time no prediction is answered.

    .venv/bin/python bench/enrol_scale.py --enrolled 20 3000
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from pillsnap.infer import enrolment
from pillsnap.infer.enrolment import Enrolled, EnrolledSpace, Probe, taken_from_trained
from pillsnap.metrics.novelty import ClassGaussians


def enrolled_drugs(count: int, dim: int, rng: np.random.Generator) -> Enrolled:
    drugs = tuple({"mapping_code": f"K-9{i:05d}", "n_photos": 5, "spread": 1.0} for i in range(count))
    return Enrolled(drugs, rng.normal(0, 1, (count, dim)).astype(np.float32))


def before_change(probe: Probe, space: EnrolledSpace, index: int) -> np.ndarray:
    """The distance line as it was: every enrolled drug's column over the whole probe, one kept."""
    every = enrolment.squared_distances(probe.whitened, space.means) / (1.0 + 1.0 / space.n_photos)[None]
    return every[:, index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--enrolled", type=int, nargs="+", default=[20, 3000], help="drugs enrolled before")
    parser.add_argument("--classes", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--per-class", type=int, default=5, help="probe crops a drug")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    means = rng.normal(0, 1, (args.classes, args.dim)).astype(np.float32)
    gaussians = ClassGaussians(means, np.eye(args.dim, dtype=np.float32))
    labels = np.repeat(np.arange(args.classes), args.per_class)
    features = (means[labels] + rng.normal(0, 0.3, (len(labels), args.dim))).astype(np.float32)
    probe = Probe(features, labels, np.full(len(labels), 0.9, np.float32), np.ones(len(labels), bool))
    print(f"{args.classes} trained drugs, {args.dim} dims, probe of {len(labels)} crops; median of {args.rounds}")
    for count in args.enrolled:
        before = enrolled_drugs(count, args.dim, rng)
        entry = {"mapping_code": "K-999999", "n_photos": 5, "spread": 1.0}
        after = before.with_drug(entry, rng.normal(0, 1, args.dim).astype(np.float32))
        space = EnrolledSpace.build(gaussians, after, 100.0)
        index = after.find("K-999999")
        old_line, new_line, whole = [], [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            old = before_change(probe, space, index)
            t1 = time.perf_counter()
            one = space.enrolled_distances(probe.whitened, slice(index, index + 1))[:, 0]
            t2 = time.perf_counter()
            taken_from_trained(probe, gaussians, before, after, "K-999999", 100.0)
            t3 = time.perf_counter()
            old_line.append(t1 - t0)
            new_line.append(t2 - t1)
            whole.append(t3 - t2)
        assert np.allclose(old, one, rtol=1e-5), "the two ways differ"
        a, b, w = (statistics.median(x) for x in (old_line, new_line, whole))
        print(f"  {count:5d} enrolled: the new drug's distances {1000 * b:7.1f} ms vs every drug's {1000 * a:7.1f} ms "
              f"({a / b:.0f}x); the whole check now {1000 * w:7.1f} ms, before ~{1000 * (w - b + a):7.1f} ms "
              f"({(w - b + a) / w:.2f}x)")


if __name__ == "__main__":
    main()
