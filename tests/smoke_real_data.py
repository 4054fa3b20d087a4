"""A short real-data training that must clear an accuracy floor; run by ``make smoke`` and ``.ci/run``.

bn_cnn, 5,000 CIFAR-10 training images, 2 epochs, evaluated on 2,000 test images. The floor sits
well below what this exact command measured on the 2-core CI machine (docs/getting-started.md), so
only a real regression (data, loop, optimiser) trips it, not seed noise.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

FLOOR_TOP1 = 0.35
SETTINGS = [
    "--model", "bn_cnn", "--max_train_samples", "5000", "--max_eval_samples", "2000", "--epochs", "2",
    "--batch_size", "64", "--learning_rate", "0.05", "--label_smoothing", "0",
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="../shared/cifar10", help="local CIFAR-10 copy in the Hub layout")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as output_dir:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--config_file", "accelerate_config.yaml",
            "train.py", "--dataset", os.path.abspath(args.dataset), "--output_dir", output_dir, *SETTINGS,
        ]  # fmt: skip
        print(" ".join(command), flush=True)
        returncode = subprocess.run(command, cwd=Path(__file__).resolve().parents[1]).returncode
        if returncode != 0:
            raise SystemExit(f"smoke FAILED: training exited with status {returncode}")
        results = json.loads(Path(output_dir, "results.json").read_text())
    top1 = results["best_metrics"]["eval_top1"]
    verdict = "passed" if top1 >= FLOOR_TOP1 else "FAILED"
    seconds = results["timing"]["total_seconds"]
    print(f"smoke {verdict}: eval top-1 {top1:.2%} (floor {FLOOR_TOP1:.0%}) in {seconds:.0f}s")
    if top1 < FLOOR_TOP1:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
