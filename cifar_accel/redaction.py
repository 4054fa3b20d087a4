"""No secret reaches the terminal: credentials inside URLs and Hugging Face tokens are masked.

``redact`` hides ``scheme://user:password@`` as ``scheme://***@``, anything shaped like a Hugging
Face token (``hf_`` and 20 or more letters or digits) as ``hf_***``, and, wherever they appear on
their own, the token in use (the ``token`` argument, ``HF_TOKEN``, ``HUGGING_FACE_HUB_TOKEN``) and
the user name and password written inside ``HF_ENDPOINT``. ``redact_log_records`` applies it to
every log record, since the Hub client logs the URLs it retries (with their credentials).
"""

import logging
import os
import re
from urllib.parse import unquote, urlsplit

MASK = "***"
# The authority of a URL ends at the first '/', '?', '#' or space; its userinfo ends at its last '@'.
URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#]*@")
HF_TOKEN_SHAPE = re.compile(r"hf_[A-Za-z0-9]{20,}")
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
# A shorter value is not searched for on its own (it would mask ordinary words); inside a URL it still is.
MIN_SECRET_LENGTH = 4


def _url_credentials(url: str) -> list[str]:
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return []
    found = [value for value in (parts.username, parts.password) if value]
    return found + [unquote(value) for value in found]


def known_secrets(token: str | None = None) -> list[str]:
    """The values to hide wherever they appear, longest first so that none is left half masked."""
    secrets = [token, *(os.environ.get(name) for name in TOKEN_VARIABLES)]
    secrets += _url_credentials(os.environ.get("HF_ENDPOINT", ""))
    usable = {secret.strip() for secret in secrets if secret and len(secret.strip()) >= MIN_SECRET_LENGTH}
    return sorted(usable, key=len, reverse=True)


def redact(text: str, token: str | None = None) -> str:
    """``text`` with every credential masked; safe to print or write anywhere."""
    for secret in known_secrets(token):
        text = text.replace(secret, MASK)
    text = URL_CREDENTIALS.sub(rf"\g<scheme>{MASK}@", text)
    return HF_TOKEN_SHAPE.sub(f"hf_{MASK}", text)


def redact_log_records() -> None:
    """From now on, the message of every log record made in this process passes through ``redact``.

    Idempotent. Needed because libraries print through ``logging`` what this package never sees:
    the Hub client warns ``'...' thrown while requesting HEAD http://user:password@host/...``.
    """
    make_record = logging.getLogRecordFactory()
    if getattr(make_record, "redacts", False):
        return

    def redacting_record(*args, **kwargs) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: left for logging to report as it always does
            return record
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return record

    redacting_record.redacts = True
    logging.setLogRecordFactory(redacting_record)
