import pytest

from cifar_accel.cli import main


def test_models_command_lists_every_registered_model(capsys):
    main(["models"])
    assert capsys.readouterr().out.split() == [
        "airbench94",
        "airbench94_muon",
        "airbench96",
        "bn_cnn",
        "resnet18",
        "resnet34",
        "resnet9",
        "simple_cnn",
    ]


@pytest.mark.parametrize(("argv", "problem"), [(["bogus"], "unknown command 'bogus'"), ([], "no command given")])
def test_a_missing_or_unknown_command_shows_the_commands_and_exits_2(argv, problem, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "loader-speed" in err and err.strip().endswith(f"error: {problem}")


def test_evaluate_without_a_saved_model_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", str(tmp_path)])
    assert exit_info.value.code == 2
    expected = f"{tmp_path}/config.json not found; a saved model is a folder holding model.safetensors and config.json"
    assert capsys.readouterr().err == f"error: {expected}\n"


def test_a_stop_wrapped_in_a_librarys_error_exits_as_a_stop_and_ignores_further_signals(capsys):
    """datasets wraps what stops its split generation in its own error: the user still sees the stop, not a
    traceback; and a second Ctrl-C while the process cleans up (loader workers) cannot print one either."""
    import signal

    from cifar_accel.cli import _run
    from cifar_accel.errors import STOP_SIGNALS, StoppedBySignal

    previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}

    def generate_split():
        try:
            raise StoppedBySignal(signal.SIGTERM, "stopped while preparing the run; nothing was trained")
        except StoppedBySignal as stop:
            raise RuntimeError("An error occurred while generating the dataset") from stop

    try:
        with pytest.raises(SystemExit) as exit_info:
            _run(generate_split)
        assert exit_info.value.code == 143
        assert capsys.readouterr().err == "SIGTERM: stopped while preparing the run; nothing was trained\n"
        assert all(signal.getsignal(number) == signal.SIG_IGN for number in STOP_SIGNALS)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
