"""Shared fixtures: small datasets in the Hub layout, written to parquet like a downloaded copy."""

import contextlib
import io
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image
from hub_server import StandInHub

REPO_ROOT = Path(__file__).resolve().parents[1]
# Tokens of the stand-in Hub's users: distinctive, so a leak anywhere is found by a substring search.
ALICE = "hf_alice_0123456789secret"
BOB = "hf_bob_0123456789secret"
# The first four are the colour datasets' classes; all ten, a 10-class set to fine-tune from.
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (200, 40, 200), (40, 200, 200),
           (120, 120, 120), (250, 250, 250), (10, 10, 10), (250, 140, 20)]  # fmt: skip


def _png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def colour_images(labels: list[int], seed: int, num_colours: int = 4, size: tuple[int, int] = (32, 32)) -> list[dict]:
    """A noisy image per label whose dominant colour is the class: learnable in a few steps. ``size``: (H, W)."""
    rng = np.random.default_rng(seed)
    images = []
    for label in labels:
        base = np.array(COLOURS[label % num_colours], dtype=np.float64)
        pixels = np.clip(base + rng.normal(0, 40, size=(*size, 3)), 0, 255).astype(np.uint8)
        images.append({"bytes": _png_bytes(pixels), "path": None})
    return images


def write_hub_layout(
    root: Path,
    split_sizes: dict[str, int],
    class_names: list[str],
    image_column: str = "img",
    label_column: str = "label",
    unique_labels: bool = False,
    num_colours: int = 4,
    image_size: tuple[int, int] = (32, 32),
) -> Path:
    """``root/data/{split}-00000-of-00001.parquet`` with an Image and a ClassLabel column."""
    (root / "data").mkdir(parents=True, exist_ok=True)
    features = Features({image_column: Image(), label_column: ClassLabel(names=class_names)})
    for index, (split, size) in enumerate(split_sizes.items()):
        labels = list(range(size)) if unique_labels else [i % len(class_names) for i in range(size)]
        images = colour_images(labels, seed=index, num_colours=num_colours, size=image_size)
        rows = {image_column: images, label_column: labels}
        Dataset.from_dict(rows, features=features).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.fixture(scope="session", autouse=True)
def decoded_image_cache(tmp_path_factory):
    """Decoded-image caches go to a temporary folder, for this process and the runs it starts."""
    os.environ["CIFAR_ACCEL_CACHE"] = str(tmp_path_factory.mktemp("decoded"))


@pytest.fixture(scope="session")
def colour_dataset(tmp_path_factory) -> Path:
    """Four learnable colour classes; 101 test images so that no batch or process count divides them."""
    return write_hub_layout(
        tmp_path_factory.mktemp("colours"), {"train": 256, "test": 101}, ["red", "green", "blue", "yellow"]
    )


def run_command(args: list[str], timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command from the repository root, as a user would, and capture its output.

    A command still running after ``timeout`` seconds fails the test with where every one of its processes
    was waiting (Python's faulthandler, on SIGABRT), so that a rare hang can be diagnosed from one CI log.
    """
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1", **(env or {})}
    with subprocess.Popen(
        args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env,
        start_new_session=True,
    ) as process:  # fmt: skip
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGABRT)  # every process of the command prints its threads' stacks
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=30)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()  # all the output, that before the timeout included
            pytest.fail(f"{shlex.join(args)} still ran after {timeout} s:\n{stdout[-3000:]}\n{stderr[-20000:]}")
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def cifar_accel_command(*args: str) -> list[str]:
    """The installed console script, from the same environment as the tests."""
    return [str(Path(sys.executable).parent / "cifar-accel"), *args]


def accelerate_launch(*launch_args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *launch_args]


def replace_column_values(dataset_root: Path, split: str, column: str, changes: dict[int, object]) -> None:
    """Overwrite some rows of a written split in place, bypassing the checks ``datasets`` makes
    when writing (out-of-range labels, undecodable image bytes): data as it may arrive from elsewhere."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = dataset_root / "data" / f"{split}-00000-of-00001.parquet"
    table = pq.read_table(path)
    values = table.column(column).to_pylist()
    for row, value in changes.items():
        values[row] = value
    index = table.schema.get_field_index(column)
    table = table.set_column(index, table.schema.field(index), pa.array(values, type=table.schema.field(index).type))
    pq.write_table(table, path)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    # hf_xet would upload through Xet, which the stand-in does not have: take the plain LFS path.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    # No token from this machine: none in the environment, none stored by `hf auth login`.
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "stored_token"))
    with StandInHub({ALICE: "alice", BOB: "bob"}) as server:
        # What HF_ENDPOINT does, for this process (the client reads it once, at import).
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.endpoint)
        template = server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        yield server


def hub_env(hub: StandInHub, tmp_path: Path, **extra: str) -> dict:
    """A subprocess pointed at the stand-in with its own empty Hugging Face cache."""
    return {**hub.client_env(), "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": "", **extra}
