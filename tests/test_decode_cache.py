from cifar_accel.config import TrainConfig
from cifar_accel.data.loading import load_data


def test_a_cache_write_killed_by_sigkill_leaves_no_temporary_behind_the_next_run(colour_dataset, tmp_path, monkeypatch):
    """The decoded images of a split are written to a temporary, then renamed; a writer killed in between
    cannot remove it, so the next writer on the machine does."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cache = tmp_path / "cache"
    writer = (
        "import time, safetensors.torch as st, cifar_accel.data.decode_cache as decode_cache\n"
        "from cifar_accel.config import TrainConfig\n"
        "from cifar_accel.data.loading import load_data\n"
        "def slow(tensors, path):\n"
        "    open(path, 'wb').write(b'x' * 1000)\n"
        "    time.sleep(60)\n"
        "decode_cache.save_file = slow\n"
        f"load_data(TrainConfig(dataset={str(colour_dataset)!r}))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", writer], env={**os.environ, "CIFAR_ACCEL_CACHE": str(cache)})
    deadline = time.monotonic() + 120
    while not list(cache.glob(".*.tmp")):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    [left] = list(cache.glob(".*.tmp"))
    mine = cache / f".other.safetensors.{left.name.rsplit('.', 3)[1]}.{os.getpid()}.tmp"  # a live writer's
    mine.write_bytes(b"")
    monkeypatch.setenv("CIFAR_ACCEL_CACHE", str(cache))
    load_data(TrainConfig(dataset=str(colour_dataset)))
    assert sorted(path.name for path in cache.glob(".*.tmp")) == [mine.name]
    assert len(list(cache.glob("*.safetensors"))) == 2  # both splits cached this time
