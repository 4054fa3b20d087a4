"""The end of training: the kept model evaluated once more, ``results.json`` and the reports.

The final metrics are counted twice, by the evaluation loop and by the ``evaluate`` library's metric on
the same predictions, and the two must agree. They are those of the saved model as ``cifar-accel
evaluate`` sees it: in float32, through the per-image loader, without TTA (reported beside them).
"""

import time
from typing import Any

from datasets import Dataset
from torch import nn

from cifar_accel.build import make_loader
from cifar_accel.data import make_dataloader
from cifar_accel.loop import evaluate, peak_memory_megabytes, timing_summary
from cifar_accel.run_records import selected_metric
from cifar_accel.run_state import Run, stop_if_requested
from cifar_accel.scoring import TOP_K_NAMES, score_predictions
from cifar_accel.selection import BestModelSaver
from cifar_accel.stopping import StepAbandoned, StopRequest


def finish_run(run: Run, saver: BestModelSaver, stop: StopRequest) -> dict:
    """The best epoch's model evaluated once more (with TTA if asked), then ``results.json`` and the reports."""
    config, accelerator, data = run.config, run.accelerator, run.data
    accelerator.wait_for_everyone()
    selecting = config.eval_strategy == "epoch"
    results: dict[str, Any] = {"num_processes": accelerator.num_processes}
    if selecting:
        saver.load_best()
    final_split, final_data = data.selection_split, data.evaluation
    if data.test is not None:
        # A validation hold-out chose the epoch; report the chosen model on the untouched split.
        final_split, final_data = config.eval_split, data.test
    try:
        if config.tta_level:
            results["tta_metrics"] = tta_evaluation(run)
        trained_time = time.perf_counter()  # evaluate() ends in a host sync: the device has finished
        final = saved_model_evaluation(run, final_data)
    except StepAbandoned:  # training is over: the checkpoint makes a resume run this evaluation again
        stop_if_requested(run, stop, "during the final evaluation")
    results["tta_level"] = config.tta_level
    scores = cross_checked_scores(final, data.class_names)
    results["final_metrics"] = {"split": final_split, "loss": final["loss"], "n": final["n"], **scores}
    if not selecting:  # the last epoch's model is the one kept: its evaluation is this one
        saver.keep_last({"loss": final["loss"], "n": final["n"], **{name: scores[name] for name in TOP_K_NAMES}})
    best = run.progress.best
    results.update(
        best_epoch=best["epoch"], selected_by=data.selection_split if selecting else "last", best_metrics=best
    )
    if run.ema is not None:  # the raw weights or their moving average (kept when nothing was compared)
        results["selected_weights"] = best["selected_weights"] if selecting else "ema"
    stop_if_requested(run, stop, "during the final evaluation")
    accelerator.log({f"final_{name}": scores[name] for name in TOP_K_NAMES}, step=config.epoch_count)
    results["timing"] = {
        **timing_summary(
            run.progress.records, run.start_time, run.data_ready_time, trained_time, bool(run.resume_from)
        ),
        **peak_memory_megabytes(accelerator),
    }
    if run.folder:
        run.folder.save_results(results)
        run.folder.save_reports(run.progress.records, results, config.hub_model_id if config.push_to_hub else None)
    stop_if_requested(run, stop, "while writing the reports")
    accelerator.print(summary_line(run, results, final))
    accelerator.end_training()
    return results


def tta_evaluation(run: Run) -> dict:
    """The kept model with test-time augmentation, on the split the final metrics report."""
    config, accelerator, data = run.config, run.accelerator, run.data
    tta_loader = (
        run.eval_loader if data.test is None else accelerator.prepare(make_loader(config, data, data.test, accelerator))
    )
    with accelerator.autocast():  # the folded copy is not wrapped by prepare()
        return evaluate(inference_model(run), tta_loader, accelerator, config.tta_level)


def saved_model_evaluation(run: Run, final_data: Dataset) -> dict:
    """The saved model exactly as `cifar-accel evaluate` and `predict` see it, predictions kept for scoring."""
    config, accelerator, data = run.config, run.accelerator, run.data
    # Through the per-image loader (the device loader normalises with a fused multiply-add, equal only to the
    # last bits), without TTA.
    final_loader = make_dataloader(
        final_data, data, False, config.eval_batch_size, config.num_workers, channels_last=config.channels_last
    )
    # In float32, without the mixed-precision wrapper: the numbers `cifar-accel evaluate` gives for the saved model.
    float32_model = accelerator.unwrap_model(run.model, keep_fp32_wrapper=False, keep_torch_compile=False)
    return evaluate(float32_model, accelerator.prepare(final_loader), accelerator, keep_predictions=True)


def cross_checked_scores(final: dict, class_names: list[str]) -> dict:
    """The ``evaluate`` library's scores of the final predictions (taken out of ``final``), which must be the
    evaluation loop's own counts."""
    scores = score_predictions(final.pop("ranked_predictions"), final.pop("labels"), class_names)
    disagreeing = [name for name in TOP_K_NAMES if scores[name] != final[name]]
    if disagreeing:  # two independent countings of the same predictions; never expected
        raise RuntimeError(f"the evaluate metric and the loop disagree on {disagreeing}: {scores} vs {final}")
    return scores


def inference_model(run: Run) -> nn.Module:
    """The trained model for its last, timed evaluation: with BatchNorm folded into the convolutions where the
    architecture offers it; as trained when compiled (a new module would be compiled again)."""
    unwrapped = run.accelerator.unwrap_model(run.model, keep_fp32_wrapper=False, keep_torch_compile=False)
    if run.config.compile or not hasattr(unwrapped, "folded_for_inference"):
        return run.model
    folded = unwrapped.folded_for_inference()
    if run.abandon_points is not None:
        run.abandon_points.attach(folded)
    return folded


def summary_line(run: Run, results: dict, final: dict) -> str:
    """The run's last line: the chosen epoch, the final accuracy and where the model is."""
    data, best, final_split = run.data, run.progress.best, results["final_metrics"]["split"]
    chosen = (
        f"best {data.selection_split} top1 {selected_metric(best, 'top1'):.2%} at epoch {best['epoch']}; "
        if run.config.eval_strategy == "epoch"
        else ""
    )
    tta = f" ({results['tta_metrics']['top1']:.2%} with TTA)" if run.config.tta_level else ""
    return (
        f"{chosen}{final_split} top1 {final['top1']:.2%}{tta}; saved to {run.config.output_dir}/best "
        f"({results['timing']['total_seconds']:.0f}s)"
    )
