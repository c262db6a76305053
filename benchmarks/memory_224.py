"""Peak memory of one training worker at 224 px: decode a batch of JPEG bytes to 224 px, make SimCLR's two views,
and run one forward + backward of SimCLR with an ImageNet-stem ResNet (``small_images=False``) on the CPU.

    python benchmarks/memory_224.py --batches 8 16 32 --backbones resnet18 resnet50

Each case runs in its own process (peak RSS is per process) and prints one line: batch, backbone, peak RSS after
the views and after the step (MiB), and the step's seconds. Peak RSS grows linearly with the batch, so two
batches give the MiB per image (two views) to extrapolate to a batch that does not fit the machine, e.g. 256;
the script prints that extrapolation. Images: the real Tiny-ImageNet validation images of ``../shared/datasets``,
upsampled to 256 px and JPEG-encoded, as an ingest keeps originals.
"""

from __future__ import annotations

import argparse
import ast
import io
import resource
import subprocess
import sys
import time
from pathlib import Path

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one_case(batch: int, backbone: str) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from ssl_core import build_method
    from ssl_core.data import decode_images
    from ssl_core.views import simclr_views

    torch.set_num_threads(1)
    images = np.load(DATASETS / "tiny32_val.npz")["x"][:batch]
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image).resize((256, 256), Image.Resampling.BILINEAR).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    decoded, _ = decode_images(encoded, 224)
    views = simclr_views(224)(decoded, torch.Generator().manual_seed(0))
    after_views = peak_mib()
    method = build_method("simclr", {"backbone": backbone, "image_size": 224, "small_images": False})
    started = time.perf_counter()
    method.training_step(views).loss.backward()
    return {"batch": batch, "backbone": backbone, "after_views_mib": round(after_views),
            "after_step_mib": round(peak_mib()), "step_s": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--extrapolate-to", type=int, default=256)
    parser.add_argument("--case", nargs=2, metavar=("BATCH", "BACKBONE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(one_case(int(args.case[0]), args.case[1]), flush=True)
        return
    for backbone in args.backbones:
        rows = []
        for batch in args.batches:
            out = subprocess.run([sys.executable, __file__, "--case", str(batch), backbone], capture_output=True,
                                 text=True, check=True).stdout.strip().splitlines()[-1]
            rows.append(ast.literal_eval(out))
            print(rows[-1], flush=True)
        if len(rows) >= 2:
            (b0, m0), (b1, m1) = (rows[-2]["batch"], rows[-2]["after_step_mib"]), (rows[-1]["batch"],
                                                                                     rows[-1]["after_step_mib"])
            per_image = (m1 - m0) / (b1 - b0)
            target = m1 + per_image * (args.extrapolate_to - b1)
            print(f"{backbone}: {per_image:.0f} MiB per image (two 224 px views); batch {args.extrapolate_to}: "
                  f"~{target / 1024:.1f} GiB peak RSS per worker (fp32, CPU; extrapolated from batches {b0}/{b1})")


if __name__ == "__main__":
    main()
