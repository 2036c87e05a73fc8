"""What int8 costs in retrieval quality: the quickstart student's float32 and int8 mobile models, each
querying the teacher's vectors of the quickstart test gallery (asymmetric mAP / Recall@K per level).

Run after `retrieval quickstart` (reads `quickstart-run/`): `python experiments/mobile_int8_quickstart.py`.
Every model is run through the engine's own runtimes (`serving.runtimes`), so this is what a server or a
phone computes. Measured after the default quickstart (seed 0) on a 2-core CPU: float32 student 79.17% mean
mAP, int8 `.onnx` and `.ort` 79.11%; the teacher on both sides 85.20%.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image

from retrieval.evaluation.asymmetric import evaluate_asymmetric
from serving.runtimes import open_query_encoder

LEVELS = ("fine", "middle", "coarse")
MODELS = ("student.onnx", "student-mobile.onnx", "student-mobile.ort")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("quickstart-run"), help="the quickstart's work directory")
    args = parser.parse_args()
    labels_csv = args.run / "data" / "test" / "labels.csv"
    rows = list(csv.DictReader(labels_csv.open()))
    images = []
    for row in rows:
        with Image.open(labels_csv.parent / row["path"]) as image:
            images.append(image.convert("RGB"))
    codes = np.stack([np.unique([row[level] for row in rows], return_inverse=True)[1] for level in LEVELS], axis=1)
    teacher = open_query_encoder(args.run / "query_encoder.onnx").encode(images)
    print(f"{len(images)} gallery images; each queries the teacher's vectors of all the others")
    for name in MODELS:
        student = open_query_encoder(args.run / name).encode(images)
        reports = evaluate_asymmetric(student, teacher, codes, list(LEVELS), include_teacher=name == MODELS[0])
        for mode, report in reports.items():
            mean = report.to_dict()["mean"]
            print(f"{name:<22} {mode:<11} mAP {100 * mean['mAP']:.2f}%  R@1 {100 * mean['R@1']:.2f}%")


if __name__ == "__main__":
    main()
