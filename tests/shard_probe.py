"""Run under ``accelerate launch --num_processes 2``: record which examples each rank trains on.

Uses the same pieces as ``train`` (build_accelerator, load_data, either loader, prepare) on a
dataset whose labels are unique, so a label names its example. Writes ``OUT/rank{R}.json``.
"""

import json
import sys
from pathlib import Path

from cifar_accel.accel import build_accelerator
from cifar_accel.config import TrainConfig
from cifar_accel.data import load_data, make_dataloader
from cifar_accel.device_data import make_device_dataloader


def main(dataset: str, output: str, batch_size: int, data_loader: str) -> None:
    config = TrainConfig(dataset=dataset, batch_size=batch_size)
    accelerator = build_accelerator(config)
    data = load_data(config)
    if data_loader == "device":
        loader = make_device_dataloader(data.train, data, True, batch_size, accelerator.device)
    else:
        loader = make_dataloader(data.train, data, train=True, batch_size=batch_size, num_workers=1)
    loader = accelerator.prepare(loader)
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        epochs.append([int(label) for _, labels in loader for label in labels])
    report = {"num_processes": accelerator.num_processes, "epochs": epochs}
    Path(output, f"rank{accelerator.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
