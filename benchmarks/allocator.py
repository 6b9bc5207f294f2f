"""What `mfv.core.allocator.keep_freed_memory` saves: Lite0's forward+backward (the render's pass,
channels_last, affine batch norms) in a child process with and without it, side by side.

Usage: python benchmarks/allocator.py [--batch 24] [--steps 6] [--repeats 2]

Prints, per variant and repeat, the child's CPU seconds (user, system) and minor page faults
over the timed steps, and the ratio of their CPU time. CPU time rather than wall time, so a
loaded machine disturbs the comparison less (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
from mfv.core.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
import mfv
from mfv.models.passes import Forward, prepared
batch, steps = int(sys.argv[2]), int(sys.argv[3])
model = mfv.load_model("efficientnet_lite0", device="cpu")
x = torch.rand(batch, 3, 224, 224) * 255
forward = Forward(channels_last=True, affine_batchnorm=True)

def step():
    images = x.clone().requires_grad_(True)
    forward(model, images)[:, 1].sum().backward()

with prepared(model, forward):
    step()  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter()
    for _ in range(steps):
        step()
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"kept": kept, "wall": wall, "user": after.ru_utime - before.ru_utime,
                  "sys": after.ru_stime - before.ru_stime,
                  "faults": after.ru_minflt - before.ru_minflt}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print(f"cpus={os.cpu_count()} load avg={' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    cpu: dict[str, list[float]] = {"default": [], "keep": []}
    for _ in range(args.repeats):
        for variant in ("default", "keep"):
            out = subprocess.run([sys.executable, "-c", CHILD, variant, str(args.batch),
                                  str(args.steps)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            cpu[variant].append(r["user"] + r["sys"])
            print(f"{variant:8s} applied={r['kept']!s:5s} wall {r['wall']:6.1f} s  user "
                  f"{r['user']:6.1f} s  sys {r['sys']:5.1f} s  minor faults "
                  f"{r['faults'] / 1e6:5.2f} M", flush=True)
    ratio = min(cpu["default"]) / min(cpu["keep"])
    print(f"CPU time default / kept = {ratio:.2f} (best of {args.repeats}, batch {args.batch}, "
          f"{args.steps} steps); load avg {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
