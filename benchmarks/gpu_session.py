"""Every GPU measurement of one device session, in order, each written to --out as soon as it ends.

A lent GPU machine is short-lived (minutes, shared with its start-up), so one command does it all, and what it has
measured survives a timeout: each step's JSON is written (temporary file, then ``os.replace``) as soon as it ends and
rewritten after every run inside it, and ``summary.md`` is rewritten with it. Each step has its own share of
``--budget_s`` (a deadline; time an earlier step leaves unused passes on): a step that would run past its deadline
stops before its next run and records how far it got. A run already under way is never cut.

1. ``01_environment.json``: Python, torch, CUDA/cuDNN, accelerate, datasets, airbench, timm versions, ``nvidia-smi
   -L``; then a warm-up outside every timer: 20 steps (``Sizes.warm_up_steps``) of our airbench94 and airbench94_muon
   recipes (``train`` with ``--max_train_steps``) and of airbench's ``train94``, each with its final evaluation
   (cuDNN's autotuning, the allocator, ``torch.compile`` with ``--our_flags --compile``).
2. ``02_side_by_side.json``: ``time_to_accuracy.py``'s comparison: our airbench94 (``--runs``, 10) and
   airbench94_muon (``--muon_runs``, 5) recipes against airbench 0.1.8's ``train94``, alternating round by round (the
   order rotating), run i of each side with seed ``--seed_base + i``; mean ± standard error, the time ratio of the
   means with its standard error and the per-round range (Muon against the ``train94`` runs of the same rounds),
   and the loader's share of our training epochs (``data_wait_seconds / train_seconds``).
3. ``03_profile.json``, ``03_profile_trace.json.gz`` (Chrome trace; open in Perfetto or chrome://tracing),
   ``03_profile_kernels.txt``: ``torch.profiler`` over one epoch of 20 steps (``Sizes.profile_steps``) of the airbench94
   recipe, built by ``build.build_run`` and trained by ``engine.train_epoch`` (the loop ``train`` runs, its host reads
   included) after an untimed epoch of as many steps; the top-20 kernels by GPU time (on the CPU: operators by self
   time) and the host syncs counted (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``, ``cudaEventSynchronize``,
   ``aten::item``, ``aten::_local_scalar_dense``; on the CPU only the last two exist).
4. ``04_airbench96.json``: our airbench96 recipe against ``train96``, ``--runs96`` (3) rounds after a warm-up of each,
   if the step's budget allows (its runs are predicted from step 2's, about 12 times airbench94's training at full
   length); otherwise skipped with the reason.
5. ``05_standard_path.json``: the resnet18 recipe through ``--data_loader torch`` for 2 epochs (images/s and seconds
   per epoch), then the steps/s of a timm model fine-tuned through ``--model local-dir:`` (random weights saved with
   ``timm.models.save_for_hf``: no Hub), measured on its second epoch; skipped with the reason where timm is not
   importable (it is not in the device image's package list, and ``../shared/device/prepare.sh`` does not carry it).

That is 8 files, the most a device run hands back: send logs to stdout (its tail comes back), not to --out.

Without CUDA the script refuses (one line), unless ``--quick``: then every step runs for real on the CPU at smoke
size, airbench through ``time_to_accuracy.airbench_runs_on_cpu`` and both sides in float32 (``--cpu
--mixed_precision no``), as ``time_to_accuracy.py --airbench_on_cpu`` does; its figures show that the script works,
not how fast anything is.

    source .device/setup.sh && python benchmarks/gpu_session.py --out $OUT     # on the lent GPU: about 8 minutes
    python benchmarks/gpu_session.py --quick --out /tmp/gs                      # CPU smoke run: about 3 minutes
"""

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
from time_to_accuracy import (
    formatted,
    mean_and_standard_error,
    our_outcome,
    run_airbench,
    time_ratio,
    train_recorded,
    write_airbench_cache,
)
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from cifar_accel.build import build_run
from cifar_accel.config import TrainConfig
from cifar_accel.engine import progress_bar, train_epoch
from cifar_accel.run_start import start_records
from cifar_accel.selection import BestModelSaver
from cifar_accel.settings import parse_train_args
from cifar_accel.stopping import StopRequest

# airbench96's timed run against airbench94's at full length, from airbench's README (A100: 3.83 s for airbench94;
# 46 s for airbench96 as in its paper, 34.7 s since): how step 4 predicts its runs from step 2's before it has one of
# its own. The larger of the two: a step skipped that would have fitted costs less than one that overruns the session.
AIRBENCH96_COST = 12.0
HOST_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::item",
              "aten::_local_scalar_dense")  # fmt: skip
TOP_KERNELS = 20
VERSIONED = ("torch", "torchvision", "accelerate", "datasets", "evaluate", "huggingface_hub", "numpy", "airbench",
             "timm")  # fmt: skip
OURS, OURS_MUON, AIRBENCH = "cifar_accel airbench94", "cifar_accel airbench94_muon", "airbench train94"
OURS96, AIRBENCH96 = "cifar_accel airbench96", "airbench train96"


@dataclass(frozen=True)
class Sizes:
    """How much each step trains (None: the recipe's own): full recipes on a GPU, a smoke-sized cut on the CPU."""

    train_images: int | None = None
    eval_images: int | None = None
    epochs: float | None = None
    batch_size: int | None = None
    warm_up_steps: int = 20
    profile_steps: int = 20
    profile_batch: int | None = None
    train_images96: int | None = None
    eval_images96: int | None = None
    resnet_train_images: int | None = None
    resnet_eval_images: int | None = None
    resnet_batch: int | None = None
    finetune_batch: int = 32
    finetune_steps: int = 100  # per epoch; the second epoch is timed
    finetune_eval_images: int = 1000
    finetune_image_size: int | None = None  # None: the timm model's own input size


# Every step trains on the CPU in seconds: batches of 32 so that a few steps fit (at the recipes' 1,024 a single
# step takes 10-20 s on 2 cores), 5 of them in step 2 (airbench's lookahead copies its weights every 5 steps, so fewer
# would leave its model untrained), 50 evaluation images (TTA runs 6 forward passes over them).
QUICK = Sizes(
    train_images=160, eval_images=50, epochs=1, batch_size=32, warm_up_steps=1, profile_steps=3, profile_batch=32,
    train_images96=32, eval_images96=32, resnet_train_images=32, resnet_eval_images=16, resnet_batch=16,
    finetune_batch=16, finetune_steps=2, finetune_eval_images=32, finetune_image_size=32,
)  # fmt: skip


@dataclass
class Session:
    """What the steps share: the settings, the output folder, the airbench caches and the measured run times."""

    args: argparse.Namespace
    sizes: Sizes
    dataset: str
    our_flags: list[str]  # for every run of ours
    on_gpu: bool
    started: float
    scratch: tempfile.TemporaryDirectory
    header: dict = field(default_factory=dict)
    records: dict[str, dict] = field(default_factory=dict)  # each step's record, in order, for summary.md
    airbench_missing: str | None = None  # why airbench's side cannot run, if it cannot
    caches: dict[tuple, str] = field(default_factory=dict)
    walls: dict[str, list[dict]] = field(default_factory=dict)  # measured runs per side, for later predictions

    @property
    def out(self) -> Path:
        return Path(self.args.out)

    def airbench_cache(self, train_images: int | None, eval_images: int | None) -> str:
        """A folder holding airbench's ``cifar10/{train,test}.pt``, written from the images our side trains on."""
        key = (train_images, eval_images)
        if key not in self.caches:
            folder = Path(self.scratch.name) / f"airbench_{len(self.caches)}"
            config = TrainConfig(dataset=self.dataset, max_train_samples=train_images, max_eval_samples=eval_images)
            write_airbench_cache(config, folder)
            self.caches[key] = str(folder)
        return self.caches[key]


class Step:
    """One step's deadline and its record, saved (JSON and summary.md) whenever it changes."""

    def __init__(self, session: Session, number: int, name: str, deadline: float, budget: float):
        self.session, self.number, self.name, self.deadline = session, number, name, deadline
        self.path = session.out / f"{number:02d}_{name}.json"
        self.record: dict = {"step": name, "number": number, "status": "running",
                             "budget_seconds": round(max(budget, 0.0), 1), "summary": []}  # fmt: skip
        self.started = time.perf_counter()

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def allows(self, seconds: float | None) -> bool:
        """Whether work predicted to take ``seconds`` ends before the deadline (unknown: if any time is left)."""
        return self.left() > (seconds or 0.0)

    def save(self, **changes: object) -> None:
        self.record.update(changes, seconds=round(time.perf_counter() - self.started, 1))
        write_atomically(self.path, json.dumps(self.record, indent=2, default=str) + "\n")
        self.session.records[self.name] = self.record
        write_atomically(self.session.out / "summary.md", summary_markdown(self.session))


def write_atomically(path: Path, text: str) -> None:
    """A reader (or a copy taken when a timeout kills the run) sees the old file or the new one, never half."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def summary_markdown(session: Session) -> str:
    header = session.header
    lines = [
        f"# GPU session on {header.get('device', '?')}",
        "",
        f"{header.get('date', '')}; `{header.get('command', '')}`; budget {session.args.budget_s:.0f} s; "
        f"{header.get('versions_line', '')}",
        "",
    ]
    if session.args.quick:
        lines += ["**CPU smoke run (`--quick`): the figures show that every step runs, not how fast anything is.**", ""]
    for name, record in session.records.items():
        number = record["number"]
        reason = f": {record['reason']}" if record.get("reason") else ""
        lines += [
            f"## {number}. {name}",
            "",
            f"{record['status']}{reason} ({record.get('seconds', 0):.1f} s of {record['budget_seconds']:.0f} s "
            f"budgeted; raw: `{number:02d}_{name}.json`)",
            "",
            *record.get("summary", []),
            "",
        ]
    return "\n".join(lines)


def sized_flags(
    train_images: int | None, eval_images: int | None, epochs: float | None, batch: int | None
) -> list[str]:
    """Our flags for these sizes; None leaves the recipe's own."""
    values = {"max_train_samples": train_images, "max_eval_samples": eval_images, "epochs": epochs, "batch_size": batch}
    return [item for name, value in values.items() if value is not None for item in (f"--{name}", str(value))]


def our_run(session: Session, recipe: str, seed: int, *flags: str) -> dict:
    """One of our runs through ``train``: accuracy and seconds as time_to_accuracy.py counts them, and the loader's
    share of the training epochs (host seconds waiting in ``next()`` over the epochs' seconds)."""
    started = time.perf_counter()
    results, records = train_recorded(
        ["--recipe", recipe, "--dataset", session.dataset, *flags, *session.our_flags, "--seed", str(seed)]
    )
    timing = results["timing"]
    return {
        "seed": seed,
        **our_outcome(results),
        "wall_seconds": time.perf_counter() - started,
        "train_seconds": timing["train_seconds"],
        "data_wait_seconds": timing["data_wait_seconds"],
        "data_wait_share": timing["data_wait_seconds"] / timing["train_seconds"],
        "epoch_data_wait_shares": [record["data_wait_seconds"] / record["train_seconds"] for record in records],
        "images_per_second": timing["images_per_second"],
        "peak_device_memory_mb": timing.get("peak_device_memory_mb"),
    }


def airbench_run(
    session: Session, variant: str, cache: str, seed: int, epochs: float | None, batch: int | None
) -> dict:
    """One airbench run through time_to_accuracy.py (on the CPU through its shim), with its wall time."""
    started = time.perf_counter()
    outcome = run_airbench(variant, cache, seed, epochs, not session.on_gpu, batch)
    return {"seed": seed, **outcome, "wall_seconds": time.perf_counter() - started}


def our_warm_up(session: Session, recipe: str, train_images: int | None, eval_images: int | None) -> dict:
    """``--warm_up_steps`` steps of the recipe and its final evaluations, with a seed no counted run uses."""
    sizes = session.sizes
    flags = sized_flags(train_images, eval_images, None, sizes.batch_size)
    return our_run(
        session, recipe, session.args.seed_base + 1000, *flags, "--max_train_steps", str(sizes.warm_up_steps)
    )


def airbench_warm_up(session: Session, variant: str, cache: str) -> dict:
    """``--warm_up_steps`` steps of airbench's ``train{variant}`` and its evaluation."""
    import airbench

    sizes = session.sizes
    batch = sizes.batch_size or getattr(airbench, f"lib_airbench{variant}").hyp["opt"]["batch_size"]
    # Memory-mapped: only the labels' length is read, not the 150 MB of images.
    labels = torch.load(Path(cache) / "cifar10" / "train.pt", mmap=True, map_location="cpu")["labels"]
    # It trains ceil(epochs x batches per epoch) steps: half a step less cannot round up to one more.
    epochs = (sizes.warm_up_steps - 0.5) / max(1, len(labels) // batch)
    return airbench_run(session, variant, cache, session.args.seed_base + 1000, epochs, sizes.batch_size)


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["cuda"] = torch.version.cuda
    found["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return found


def nvidia_smi() -> str:
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as error:
        return f"(nvidia-smi -L did not run: {error})"
    return (listing.stdout or listing.stderr).strip() or f"(nvidia-smi -L printed nothing, exit {listing.returncode})"


def commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # the device machine gets the working tree without .git
        return None


def step_environment(session: Session, step: Step) -> None:
    """Versions and the device, then the untimed warm-up of what step 2 times."""
    found, sizes = versions(), session.sizes
    step.record.update(versions=found, nvidia_smi=nvidia_smi(), commit=commit(), header=session.header)
    if session.on_gpu:
        properties = torch.cuda.get_device_properties(0)
        step.record["gpu"] = {
            "name": properties.name, "memory_gib": round(properties.total_memory / 2**30, 1),
            "capability": f"{properties.major}.{properties.minor}", "count": torch.cuda.device_count(),
        }  # fmt: skip
    step.record["summary"] = [
        f"- versions: {', '.join(f'{name} {value}' for name, value in found.items())}",
        f"- `nvidia-smi -L`: {step.record['nvidia_smi']}",
        f"- commit {step.record['commit']}; {session.header['processor']}, {torch.get_num_threads()} torch threads",
    ]
    step.save()
    warm_ups = {}
    for name, recipe in ((OURS, "airbench94"), (OURS_MUON, "airbench94_muon")):
        warm_ups[name] = our_warm_up(session, recipe, sizes.train_images, sizes.eval_images)
        step.save(warm_ups=warm_ups)
    if session.airbench_missing is None:
        warm_ups[AIRBENCH] = airbench_warm_up(
            session, "94", session.airbench_cache(sizes.train_images, sizes.eval_images)
        )
    step.record["summary"].append(
        f"- warm-up, {sizes.warm_up_steps} step(s) each and the final evaluation, not counted: "
        + ", ".join(f"{name} {outcome['wall_seconds']:.1f} s" for name, outcome in warm_ups.items())
        + (f" (airbench not run: {session.airbench_missing})" if session.airbench_missing else "")
    )
    step.save(warm_ups=warm_ups, status="done")


def run_rounds(
    step: Step,
    session: Session,
    sides: dict[str, tuple[int, Callable[[int], dict]]],
    results: dict[str, list[dict]],
    report: Callable[[], dict],
) -> str | None:
    """Round i runs each side that wants more than i runs, with seed seed_base + i, the sides' order rotating round by
    round; after each round the step saves ``report()``. Stops before a round predicted (from each side's last run) to
    end past the deadline: returns why."""
    for round_index in range(max(count for count, _ in sides.values())):
        names = [name for name, (count, _) in sides.items() if round_index < count]
        names = names[round_index % len(names) :] + names[: round_index % len(names)]
        predicted = sum(results[name][-1]["wall_seconds"] for name in names if results[name])
        if not step.allows(predicted if all(results[name] for name in names) else None):
            return f"budget: stopped after {round_index} round(s), the next predicted at {predicted:.0f} s"
        for name in names:
            outcome = sides[name][1](session.args.seed_base + round_index)
            results[name].append(outcome)
            session.walls.setdefault(name, []).append(outcome)
            print(f"{step.name} round {round_index + 1} {name}: accuracy {outcome['accuracy']:.4f}, "
                  f"{outcome['seconds']:.2f} s ({outcome['wall_seconds']:.1f} s end to end)", flush=True)  # fmt: skip
        step.save(rounds_done=round_index + 1, **report())
    return None


def side_table(results: dict[str, list[dict]]) -> list[str]:
    lines = [
        "| side | runs | accuracy (mean ± s.e.) | seconds (mean ± s.e.) | end to end, s | loader share of epochs |",
        "|---|---|---|---|---|---|",
    ]
    for name, outcomes in results.items():
        if not outcomes:
            continue
        end_to_end = [outcome.get("end_to_end_seconds", outcome["wall_seconds"]) for outcome in outcomes]
        shares = [outcome["data_wait_share"] for outcome in outcomes if "data_wait_share" in outcome]
        share = formatted([100 * value for value in shares], 2) + " %" if shares else "n/a (its own loop)"
        lines.append(
            f"| {name} | {len(outcomes)} | {formatted([o['accuracy'] for o in outcomes], 4)} | "
            f"{formatted([o['seconds'] for o in outcomes], 3)} | {formatted(end_to_end, 1)} | {share} |"
        )
    return lines


def ratio_line(name: str, ours: list[dict], theirs: list[dict], against: str) -> tuple[dict | None, str]:
    pairs = min(len(ours), len(theirs))
    if not pairs:
        return None, f"- {name} / {against}: no paired runs"
    ratio = time_ratio([o["seconds"] for o in ours[:pairs]], [o["seconds"] for o in theirs[:pairs]])
    spread = "(n=1)" if ratio["standard_error"] is None else f"± {ratio['standard_error']:.3f}"
    return ratio, (
        f"- time ratio {name} / {against} (ratio of means, {pairs} paired round(s)): **{ratio['ratio']:.3f}** "
        f"{spread}, per round {ratio['min']:.3f} to {ratio['max']:.3f}"
    )


def compared(results: dict[str, list[dict]], pairs: tuple[tuple[str, str], ...], airbench_missing: str | None) -> dict:
    """A comparison step's record from its runs so far: the runs, their statistics, the time ratios of each pair
    (ours, airbench's), and the summary's lines."""
    lines, ratios = side_table(results), {}
    for ours, theirs in pairs:
        if theirs in results:
            ratios[ours], line = ratio_line(ours, results[ours], results[theirs], theirs)
            lines.append(line)
    first = results[pairs[0][0]]
    if first:
        shares = ", ".join(f"{100 * share:.2f}" for share in first[-1]["epoch_data_wait_shares"])
        lines.append(
            f"- loader share per epoch of the last {pairs[0][0]} run, %: {shares} (host seconds waiting in `next()` "
            "over the epoch's training seconds; with the device loader on a GPU a batch's augmentation is only queued)"
        )
    if airbench_missing:
        lines.append(f"- airbench not run: {airbench_missing}")
    return {"runs": results, "summary_by_side": summarised(results), "time_ratios": ratios, "summary": lines}


def summarised(results: dict[str, list[dict]]) -> dict:
    """Mean and standard error (None for one run) of each side's measures; airbench's have no loader share."""
    summary = {}
    for name, outcomes in results.items():
        measures = [measure for measure in ("accuracy", "seconds", "wall_seconds", "data_wait_share")
                    if outcomes and measure in outcomes[0]]  # fmt: skip
        statistics = {measure: mean_and_standard_error([o[measure] for o in outcomes]) for measure in measures}
        summary[name] = {
            measure: {"mean": mean, "standard_error": error} for measure, (mean, error) in statistics.items()
        }
    return summary


def step_side_by_side(session: Session, step: Step) -> None:
    """Our airbench94 and airbench94_muon recipes against airbench's train94, alternating."""
    sizes, args = session.sizes, session.args
    flags = sized_flags(sizes.train_images, sizes.eval_images, sizes.epochs, sizes.batch_size)
    sides: dict[str, tuple[int, Callable[[int], dict]]] = {
        OURS: (args.runs, lambda seed: our_run(session, "airbench94", seed, *flags)),
        OURS_MUON: (args.muon_runs, lambda seed: our_run(session, "airbench94_muon", seed, *flags)),
    }
    if session.airbench_missing is None:
        cache = session.airbench_cache(sizes.train_images, sizes.eval_images)
        runs = max(args.runs, args.muon_runs)  # Muon's rounds are paired with train94's too
        sides[AIRBENCH] = (runs, lambda seed: airbench_run(session, "94", cache, seed, sizes.epochs, sizes.batch_size))
    results: dict[str, list[dict]] = {name: [] for name in sides}
    step.record.update(settings={"runs": args.runs, "muon_runs": args.muon_runs, "seed_base": args.seed_base,
                                 "our_flags": [*flags, *session.our_flags]})  # fmt: skip
    # Muon against the train94 runs of the same rounds.
    report = partial(compared, results, ((OURS, AIRBENCH), (OURS_MUON, AIRBENCH)), session.airbench_missing)
    stopped = run_rounds(step, session, sides, results, report)
    step.save(status="stopped early" if stopped else "done", reason=stopped, **report())


def kernel_table(prof: profile, on_gpu: bool) -> tuple[list[dict], str]:
    """The top kernels (and copies) by GPU time, as rows and as text; where none were recorded (a CPU, or a GPU
    without CUPTI), the top operators by self CPU time instead, titled so."""
    totals: Counter = Counter()
    calls: Counter = Counter()
    if on_gpu:
        for event in prof.events():
            if event.device_type == DeviceType.CUDA:
                totals[event.name] += event.time_range.elapsed_us()
                calls[event.name] += 1
        title = f"top {TOP_KERNELS} GPU kernels by total time"
    if not totals:  # a CPU runs no kernels; on a GPU without CUPTI the profiler records none
        for average in prof.key_averages():
            totals[average.key] += average.self_cpu_time_total
            calls[average.key] += average.count
        title = f"top {TOP_KERNELS} CPU operators by self time (no GPU kernels were recorded)"
    everything = sum(totals.values()) or 1.0
    rows = [
        {"name": name, "calls": calls[name], "total_ms": microseconds / 1000, "share": microseconds / everything}
        for name, microseconds in totals.most_common(TOP_KERNELS)
    ]
    text = [title, f"{'total ms':>10} {'share':>7} {'calls':>7}  name"]
    text += [f"{row['total_ms']:>10.3f} {100 * row['share']:>6.1f}% {row['calls']:>7}  {row['name']}" for row in rows]
    return rows, "\n".join(text)


def operator_table(prof: profile, on_gpu: bool) -> str:
    """The profiler's own table, for the operators that launched those kernels."""
    for sort_by in ("self_device_time_total", "self_cuda_time_total") if on_gpu else ("self_cpu_time_total",):
        try:
            return prof.key_averages().table(sort_by=sort_by, row_limit=TOP_KERNELS)
        except (AttributeError, KeyError):  # the name of the device-time column changed across torch releases
            continue
    return prof.key_averages().table(row_limit=TOP_KERNELS)


def step_profile(session: Session, step: Step) -> None:
    """One epoch of airbench94 under torch.profiler, after an untimed epoch of as many steps."""
    sizes, steps = session.sizes, session.sizes.profile_steps
    batch_flags = ["--batch_size", str(sizes.profile_batch)] if sizes.profile_batch else []
    recipe_flags = ["--recipe", "airbench94", "--dataset", session.dataset, *batch_flags, *session.our_flags]
    batch = parse_train_args(recipe_flags).batch_size
    with tempfile.TemporaryDirectory() as output_dir:
        # Two epochs of exactly `steps` batches (the recipe drops the last incomplete one).
        flags = [*recipe_flags, "--output_dir", output_dir, "--max_train_samples", str(steps * batch), "--epochs", "2"]
        flags += [*sized_flags(None, sizes.eval_images, None, None), "--seed", str(session.args.seed_base)]
        config = parse_train_args(flags)
        activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if session.on_gpu else [])]
        with StopRequest() as stop:
            run = build_run(config, time.perf_counter(), stop)
            try:
                saver = BestModelSaver(run)
                start_records(run)
                with progress_bar(run) as bar:
                    train_epoch(run, saver, stop, bar)  # cuDNN's choices, the allocator's pools, first-call caches
                    with profile(activities=activities) as prof:
                        started = time.perf_counter()
                        train_epoch(run, saver, stop, bar)
                        if session.on_gpu:
                            torch.cuda.synchronize()
                        seconds = time.perf_counter() - started
            finally:
                if run.folder:
                    run.folder.close()
    steps_profiled = len(run.train_loader)
    rows, kernels_text = kernel_table(prof, session.on_gpu)
    counted = Counter(event.name for event in prof.events() if event.name in HOST_SYNCS)
    syncs = {name: counted.get(name, 0) for name in HOST_SYNCS}
    trace = session.out / "03_profile_trace.json.gz"
    temporary = trace.with_name(".03_profile_trace.tmp.json.gz")  # the profiler gzips what ends in .gz
    prof.export_chrome_trace(str(temporary))
    os.replace(temporary, trace)
    operators = operator_table(prof, session.on_gpu)
    text = f"{kernels_text}\n\nthe profiler's operator table (top {TOP_KERNELS})\n{operators}\n"
    write_atomically(session.out / "03_profile_kernels.txt", text)
    step.save(
        status="done", steps=steps_profiled, batch_size=batch, seconds_profiled=seconds,
        milliseconds_per_step=1000 * seconds / steps_profiled, host_syncs=syncs,
        host_syncs_per_step={name: count / steps_profiled for name, count in syncs.items()},
        top_kernels=rows, trace=trace.name, trace_bytes=trace.stat().st_size, kernel_table="03_profile_kernels.txt",
        summary=[
            f"- {steps_profiled} steps of batch {batch} through `engine.train_epoch` (its end-of-epoch reads included) "
            f"in {seconds:.3f} s under the profiler: {1000 * seconds / steps_profiled:.1f} ms a step",
            "- host syncs: " + ", ".join(f"{name} {count}" for name, count in syncs.items()),
            f"- trace `{trace.name}` ({trace.stat().st_size / 2**20:.1f} MiB), tables in `03_profile_kernels.txt`:",
            "",
            "```",
            kernels_text,
            "```",
        ],
    )  # fmt: skip


def predicted_96(session: Session, name94: str) -> float | None:
    """A full-length airbench96 run predicted from the airbench94 runs of step 2: the part outside the timed
    training stays, the timed part grows by AIRBENCH96_COST."""
    measured = session.walls.get(name94)
    if not measured:
        return None
    wall, seconds = (sum(o[key] for o in measured) / len(measured) for key in ("wall_seconds", "seconds"))
    return wall - seconds + AIRBENCH96_COST * seconds


def step_airbench96(session: Session, step: Step) -> None:
    """Our airbench96 recipe against airbench's train96, as many rounds of --runs96 as the budget allows."""
    sizes, args = session.sizes, session.args
    train_images, eval_images = sizes.train_images96, sizes.eval_images96
    flags = sized_flags(train_images, eval_images, sizes.epochs, sizes.batch_size)
    with_airbench = session.airbench_missing is None
    guesses = [predicted_96(session, OURS), *([predicted_96(session, AIRBENCH)] if with_airbench else [])]
    # Step 2's runs predict these only where both steps train on the same images (not with --quick).
    same_images = (train_images, eval_images) == (sizes.train_images, sizes.eval_images)
    pair = None if None in guesses or not same_images else sum(guesses)
    step.record.update(predicted_round_seconds=pair, settings={"runs": args.runs96, "our_flags": flags})
    # The warm-ups cost a few seconds each: the first round must fit after them.
    if pair is not None and not step.allows(pair * 1.1):
        reason = f"budget: one round predicted at {pair:.0f} s, {max(step.left(), 0):.0f} s left"
        step.save(status="skipped", reason=reason, summary=[f"- skipped: {reason}"])
        return
    warm_ups = {OURS96: our_warm_up(session, "airbench96", train_images, eval_images)}
    sides: dict[str, tuple[int, Callable[[int], dict]]] = {
        OURS96: (args.runs96, lambda seed: our_run(session, "airbench96", seed, *flags))
    }
    if with_airbench:
        cache = session.airbench_cache(train_images, eval_images)
        warm_ups[AIRBENCH96] = airbench_warm_up(session, "96", cache)
        sides[AIRBENCH96] = (args.runs96, lambda seed: airbench_run(session, "96", cache, seed, sizes.epochs,
                                                                     sizes.batch_size))  # fmt: skip
    results: dict[str, list[dict]] = {name: [] for name in sides}
    report = partial(compared, results, ((OURS96, AIRBENCH96),), session.airbench_missing)
    step.save(warm_ups=warm_ups, **report())
    if pair is not None and not step.allows(pair):
        stopped = f"budget: after the warm-ups one round predicted at {pair:.0f} s, {max(step.left(), 0):.0f} s left"
    else:
        stopped = run_rounds(step, session, sides, results, report)
    step.save(status="stopped early" if stopped else "done", reason=stopped, **report())


def epoch_rows(records: list[dict]) -> list[dict]:
    keys = ("epoch", "seconds", "train_seconds", "eval_seconds", "images_per_second", "data_wait_seconds")
    return [{key: record.get(key) for key in keys} for record in records]


def step_standard_path(session: Session, step: Step) -> None:
    """resnet18 through the per-image torch loader for 2 epochs, then a timm model's fine-tuning steps/s."""
    sizes, seed = session.sizes, session.args.seed_base
    flags = sized_flags(sizes.resnet_train_images, sizes.resnet_eval_images, 2, sizes.resnet_batch)
    flags += ["--data_loader", "torch"]
    started = time.perf_counter()
    results, records = train_recorded(
        ["--recipe", "resnet18", "--dataset", session.dataset, *flags, *session.our_flags, "--seed", str(seed)]
    )
    resnet = {
        "flags": [*flags, *session.our_flags], "epochs": epoch_rows(records), "timing": results["timing"],
        "final_top1": results["final_metrics"]["top1"], "wall_seconds": time.perf_counter() - started,
    }  # fmt: skip
    lines = ["| resnet18, `--data_loader torch` | images/s | epoch seconds | of which evaluation | loader share |",
             "|---|---|---|---|---|"]  # fmt: skip
    lines += [
        f"| epoch {row['epoch']} | {row['images_per_second']:,.0f} | {row['seconds']:.2f} | {row['eval_seconds']:.2f} "
        f"| {100 * row['data_wait_seconds'] / row['train_seconds']:.1f} % |"
        for row in resnet["epochs"]
    ]
    step.save(resnet18=resnet, summary=lines)
    if importlib.util.find_spec("timm") is None:
        reason = "timm is not importable (not in the device image's list, and ../shared/device/prepare.sh lacks it)"
        step.save(status="done", fine_tune={"skipped": reason}, summary=[*lines, f"- timm fine-tune skipped: {reason}"])
        return
    if not step.allows(None):
        reason = "budget: no time left for the timm fine-tune"
        step.save(status="stopped early", reason=reason, fine_tune={"skipped": reason})
        return
    fine_tune = timm_fine_tune(session)
    lines.append(
        f"- timm `{fine_tune['model']}` fine-tune (`--model local-dir:`, random weights, input "
        f"{fine_tune['image_size']}, batch {fine_tune['batch_size']}): **{fine_tune['steps_per_second']:.2f} steps/s** "
        f"over epoch 2's {fine_tune['steps']} steps ({fine_tune['images_per_second']:,.0f} images/s)"
    )
    step.save(status="done", fine_tune=fine_tune, summary=lines)


def timm_fine_tune(session: Session) -> dict:
    import timm

    sizes, name = session.sizes, session.args.timm_model
    with tempfile.TemporaryDirectory() as folder:
        network = timm.create_model(name, pretrained=False, num_classes=10)
        size = sizes.finetune_image_size or network.pretrained_cfg["input_size"][-1]
        timm.models.save_for_hf(network, folder, safe_serialization=True, data_config={"input_size": (3, size, size)})
        images = sizes.finetune_steps * sizes.finetune_batch
        flags = [
            "--model", f"local-dir:{folder}", "--dataset", session.dataset, "--eval_strategy", "no",
            *sized_flags(images, sizes.finetune_eval_images, 2, sizes.finetune_batch), *session.our_flags,
            "--seed", str(session.args.seed_base),
        ]  # fmt: skip
        results, records = train_recorded(flags)
    # The first epoch holds cuDNN's autotuning. Each epoch starts its loader workers afresh (persistent_workers=False),
    # so the timed one includes that start, as every epoch of the trainer does.
    timed = records[-1]
    steps = -(-timed["train_examples"] // sizes.finetune_batch)
    return {
        "model": name, "image_size": size, "batch_size": sizes.finetune_batch, "steps": steps,
        "steps_per_second": steps / timed["train_seconds"], "images_per_second": timed["images_per_second"],
        "epochs": epoch_rows(records), "final_top1": results["final_metrics"]["top1"], "flags": flags[4:],
    }  # fmt: skip


STEPS: tuple[tuple[str, float, Callable[[Session, Step], None]], ...] = (
    ("environment", 0.08, step_environment),
    ("side_by_side", 0.42, step_side_by_side),
    ("profile", 0.07, step_profile),
    ("airbench96", 0.31, step_airbench96),
    ("standard_path", 0.12, step_standard_path),
)  # shares of --budget_s


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default=os.environ.get("CIFAR10_DIR") or "../shared/cifar10")
    parser.add_argument("--out", required=True, help="folder for the JSON of each step and summary.md")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: every step at a few steps' size")
    parser.add_argument("--budget_s", type=float, default=480.0, help="the whole session; each step has a share")
    parser.add_argument("--runs", type=int, default=10, help="step 2: airbench94 runs per side")
    parser.add_argument("--muon_runs", type=int, default=5, help="step 2: airbench94_muon runs")
    parser.add_argument("--runs96", type=int, default=3, help="step 4: airbench96 runs per side, if the budget allows")
    parser.add_argument("--seed_base", type=int, default=0, help="run i of each side uses seed seed_base + i")
    parser.add_argument("--our_flags", default="", help="extra train.py flags for every run of ours, e.g. '--compile'")
    parser.add_argument("--timm_model", help="step 5's timm architecture (default resnet18; --quick: test_resnet)")
    args = parser.parse_args()
    if min(args.runs, args.muon_runs, args.runs96) < 1 or args.budget_s <= 0:
        parser.error("--runs, --muon_runs and --runs96 must be at least 1, --budget_s positive")
    if args.quick:
        args.runs = args.muon_runs = args.runs96 = 1
    # A tiny model's step rate on a GPU would measure kernel launches, not a fine-tune; on the CPU it keeps seconds.
    args.timm_model = args.timm_model or ("test_resnet" if args.quick else "resnet18")
    return args


def main() -> None:
    args = parse_arguments()
    on_gpu = torch.cuda.is_available() and not args.quick
    if not on_gpu and not args.quick:
        sys.exit("gpu_session.py: needs a CUDA device (--quick runs every step at smoke size on the CPU)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    session = Session(
        args=args, sizes=QUICK if args.quick else Sizes(), dataset=os.path.abspath(args.dataset),
        our_flags=["--cpu", "--mixed_precision", "no"] * (not on_gpu) + shlex.split(args.our_flags), on_gpu=on_gpu,
        started=time.perf_counter(), scratch=tempfile.TemporaryDirectory(prefix="gpu_session_"),
    )  # fmt: skip
    try:  # imported before cudnn.benchmark is set below: importing airbench sets the flag to True
        import airbench  # noqa: F401
    except ImportError as error:
        session.airbench_missing = (
            f"airbench is not importable ({error}); on the device ../shared/device/prepare.sh carries it"
        )
    torch.backends.cudnn.benchmark = True  # both sides, as time_to_accuracy.py's default
    found = versions()
    session.header = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()})",
        "processor": platform.processor() or platform.machine(),
        "command": " ".join(["python", "benchmarks/gpu_session.py", *sys.argv[1:]]),
        "sizes": asdict(session.sizes),
        "versions_line": ", ".join(f"{name} {found[name]}" for name in ("torch", "cuda", "accelerate", "airbench")),
    }
    budget_share = 0.0
    for number, (name, share, function) in enumerate(STEPS, start=1):
        budget_share += share
        deadline = session.started + args.budget_s * budget_share  # what an earlier step left unused passes on
        step = Step(session, number, name, deadline, deadline - time.perf_counter())
        print(f"\n== step {number}: {name}, {max(step.left(), 0):.0f} s until its deadline", flush=True)
        try:
            if step.left() > 0 or number == 1:  # the versions are recorded whatever the budget
                function(session, step)
            else:  # earlier steps overran into this one's share as well
                reason = "budget: the session's time for this step was spent before it began"
                step.save(status="skipped", reason=reason, summary=[f"- skipped: {reason}"])
        except Exception as error:  # one step's failure must not cost the measurements of the others
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            step.save(status="failed", reason=f"{type(error).__name__}: {error}".splitlines()[0],
                      traceback=traceback.format_exc()[-4000:])  # fmt: skip
        print("\n".join([f"-- {name}: {step.record['status']} in {step.record['seconds']:.1f} s",
                         *step.record["summary"]]), flush=True)  # fmt: skip
    session.scratch.cleanup()
    total = time.perf_counter() - session.started
    print(f"\nsession done in {total:.0f} s (budget {args.budget_s:.0f} s); results in {args.out}", flush=True)


if __name__ == "__main__":
    main()
