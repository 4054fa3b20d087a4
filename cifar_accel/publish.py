"""``--push_to_hub``: the finished run to the Hugging Face Hub, by the main process."""

from cifar_accel.errors import UserError
from cifar_accel.hub import push_run
from cifar_accel.run_state import Run
from cifar_accel.stopping import StopRequest


def push(run: Run, stop: StopRequest) -> None:
    """The finished run to the Hub, from the main process; a failed or interrupted push keeps the run."""
    config = run.config
    retry = (
        f"the run is saved in {config.output_dir}: push it with cifar-accel push "
        f"--run_dir {config.output_dir} --repo_id {config.hub_model_id}"
    )
    if not run.accelerator.is_main_process:
        return
    # Nothing to checkpoint while pushing: a signal stops at once, with the command that pushes it later.
    stop.stop_at_once(f"stopped while pushing; {retry}")
    try:
        url = push_run(config.output_dir, config.hub_model_id, private=config.hub_private_repo)
    except UserError as error:
        raise UserError(f"{error}; {retry}") from None
    finally:
        stop.stop_at_once(None)
    run.accelerator.print(f"pushed the best model to {url}")
