"""No secret in any output: credentials inside URLs (``HF_ENDPOINT`` included) and Hugging Face tokens."""

import io
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import cifar_accel_command, run_command, write_hub_layout

from cifar_accel.errors import UserError
from cifar_accel.redaction import redact, redact_log_records

PASSWORD = "s3cretPass"
TOKEN = "hf_" + "Fake0Token1For2Redaction3Test"  # 'hf_' and 29 letters and digits: a token's shape
CREDENTIALED_ENDPOINT = f"http://someuser:{PASSWORD}@127.0.0.1:9"  # nothing listens on port 9


@pytest.fixture
def no_secrets_in_environment(monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("cannot reach http://user:pw@example.com:8080/a", "cannot reach http://***@example.com:8080/a"),
        ("https://token123@hub.example/x?y=1", "https://***@hub.example/x?y=1"),
        ("at 'http://u:p@ss@127.0.0.1:9' and https://a:b@c/d", "at 'http://***@127.0.0.1:9' and https://***@c/d"),
        ("(socks5h://proxy-user:pa%40ss@proxy:1080)", "(socks5h://***@proxy:1080)"),
        ("the token hf_abcdefghijABCDEFGHIJ0123 was refused", "the token hf_*** was refused"),
        ("Bearer hf_abcdefghijABCDEFGHIJ", "Bearer hf_***"),
    ],
)
def test_redact_masks_url_credentials_and_token_shapes(text, expected, no_secrets_in_environment):
    assert redact(text) == expected
    assert redact(expected) == expected


@pytest.mark.parametrize(
    "text",
    [
        "cannot reach http://127.0.0.1:9 ([Errno 111] Connection refused)",
        "email someone@example.com about https://huggingface.co/alice/x/tree/main",
        "hf_short_name and hf_abcdefghijABCDEFGHI (19 characters) are not tokens",
        "",
    ],
)
def test_redact_leaves_text_without_secrets_alone(text, no_secrets_in_environment):
    assert redact(text) == text


def test_redact_masks_the_token_in_use_and_the_endpoint_credentials_wherever_they_appear(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "plain-token-without-prefix")
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror-user:pa%2Fss%40word@mirror.example")
    text = "plain-token-without-prefix, --token given-on-the-command-line, mirror-user, pa/ss@word, pa%2Fss%40word"
    assert redact(text, token="given-on-the-command-line") == "***, --token ***, ***, ***, ***"


def test_redact_ignores_values_too_short_to_search_for(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "ab")
    monkeypatch.setenv("HF_ENDPOINT", "http://a:b@127.0.0.1:9")
    assert redact("a table, b, and http://a:b@127.0.0.1:9") == "a table, b, and http://***@127.0.0.1:9"


def test_log_records_are_redacted_once_installed(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    previous = logging.getLogRecordFactory()
    stream = io.StringIO()
    logger = logging.getLogger("cifar_accel.test_redaction")
    handler = logging.StreamHandler(stream)
    logger.addHandler(handler)
    try:
        redact_log_records()
        redact_log_records()  # idempotent: one wrapper, not two
        logger.warning("'%s' thrown while requesting HEAD %s/x", "refused", CREDENTIALED_ENDPOINT)
        logger.warning("token %s, ratio %d%%", TOKEN, 50)
        logger.warning("nothing to hide: %s", {"a": 1})
    finally:
        logging.setLogRecordFactory(previous)
        logger.removeHandler(handler)
    assert stream.getvalue().splitlines() == [
        "'refused' thrown while requesting HEAD http://***@127.0.0.1:9/x",
        "token ***, ratio 50%",
        "nothing to hide: {'a': 1}",
    ]


def test_hub_errors_hide_what_the_client_echoed(no_secrets_in_environment, monkeypatch):
    import huggingface_hub

    from cifar_accel.hub_access import hub_errors

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", CREDENTIALED_ENDPOINT)
    with pytest.raises(UserError) as raised:
        with hub_errors("cannot push to a/b", "a/b", token="plain-secret-token"):
            raise ConnectionError(f"refused: {CREDENTIALED_ENDPOINT}/api with Bearer plain-secret-token")
    assert str(raised.value) == (
        "cannot push to a/b: cannot reach http://***@127.0.0.1:9 (refused: http://***@127.0.0.1:9/api with Bearer ***)"
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """The smallest finished run: 32 training images, one epoch."""
    root = tmp_path_factory.mktemp("redaction")
    dataset = write_hub_layout(root / "data", {"train": 32, "test": 16}, ["red", "green", "blue", "yellow"])
    flags = "--model simple_cnn --epochs 1 --batch_size 16 --num_workers 0"
    command = [sys.executable, "train.py", "--dataset", str(dataset), "--output_dir", str(root / "run"), *flags.split()]
    result = run_command(command)
    assert result.returncode == 0, result.stderr[-3000:]
    return root / "run"


def test_push_returns_the_repo_url_without_credentials(finished_run, no_secrets_in_environment, monkeypatch):
    import cifar_accel.hub

    class RecordingApi:  # what HfApi answers when HF_ENDPOINT carries credentials: URLs built from it
        def __init__(self, token):
            pass

        def create_repo(self, repo_id, **options):
            return f"{CREDENTIALED_ENDPOINT}/{repo_id}"

        def create_branch(self, repo_id, **options):
            pass

        def create_commit(self, repo_id, operations, **options):
            pass

    monkeypatch.setattr(cifar_accel.hub, "HfApi", RecordingApi)
    url = cifar_accel.hub.push_run(finished_run, "someone/model", token=TOKEN, revision="v1")
    assert url == "http://***@127.0.0.1:9/someone/model/tree/v1"


@pytest.mark.slow  # four commands at once, each through the Hub client's 30 s of retries
def test_no_command_shows_the_endpoint_password_or_the_token(finished_run, tmp_path):
    """The Hub cannot be reached at an endpoint with credentials: every command still says so in one
    ``error:`` line, and neither the password nor the token appears in anything it printed
    (the Hub client's own retry warnings included)."""
    image = tmp_path / "red.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (200, 40, 40)).save(image)
    env = {"HF_ENDPOINT": CREDENTIALED_ENDPOINT, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path)}
    commands = {
        "train": [sys.executable, "train.py", "--dataset", "someone/cifar", "--output_dir", str(tmp_path / "out")],
        "predict": cifar_accel_command("predict", "--model", "someone/model", str(image)),
        "evaluate": cifar_accel_command("evaluate", "--model", "someone/model"),
        "push": cifar_accel_command("push", "--run_dir", str(finished_run), "--repo_id", "someone/model"),
    }
    # The client retries a refused download for about 30 s: the four run side by side.
    with ThreadPoolExecutor(len(commands)) as pool:
        futures = {name: pool.submit(run_command, command, env=env) for name, command in commands.items()}
        results = {name: future.result() for name, future in futures.items()}
    expected = {
        "train": "error: cannot reach the Hugging Face Hub to load 'someone/cifar'",
        "predict": "error: cannot download someone/model: cannot reach http://***@127.0.0.1:9,",
        "evaluate": "error: cannot download someone/model: cannot reach http://***@127.0.0.1:9,",
        "push": "error: cannot push to someone/model: cannot reach http://***@127.0.0.1:9 (",
    }
    for name, result in results.items():
        output = result.stdout + result.stderr
        assert result.returncode == 2, (name, output[-2000:])
        assert PASSWORD not in output and "someuser" not in output and TOKEN not in output, (name, output[-3000:])
        [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert line.startswith(expected[name]), (name, line)
    assert "thrown while requesting HEAD http://***@127.0.0.1:9/someone/model/" in results["predict"].stderr
