"""Log set-up of nodes and workers: one record, one line, whatever a client sent (SPEC §3).

Log messages carry client-supplied strings (user ids from tokens, device ids, frame
ids). A newline in one must not start a line of its own that reads like a record of
ours, so every record is one line: `text` escapes control characters (and lone
surrogates, which are not text) in the message, and indents a traceback's lines under
it; `json` writes one JSON object per line, its strings escaped by the encoder.
"""

from __future__ import annotations

import logging
import re
import sys
import time

import orjson

FORMATS = ("text", "json")

# C0 and C1 controls, DEL, the Unicode line and paragraph separators, and surrogates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def escape(text: str) -> str:
    """`text` with every character that could break or fake a log line written as an escape."""
    return _UNSAFE.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code in (0x0A, 0x0D, 0x09):
        return {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}[code]
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, the message escaped; a traceback's lines indented."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: logging._SysExcInfoType) -> str:
        # Indented, so no line of a traceback (whose last line quotes the exception's
        # message, which may hold client text) can pass for a record.
        text = super().formatException(ei)
        return "\n".join("    " + escape(line) for line in text.splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("    " + escape(line) for line in stack_info.splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per record: `time`, `level`, `logger`, `message`, `exc`?."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": _text(record.getMessage()),
        }
        if record.exc_info:
            entry["exc"] = _text(self.formatException(record.exc_info))
        if record.stack_info:
            entry["stack"] = _text(self.formatStack(record.stack_info))
        return orjson.dumps(entry).decode()


def _text(value: str) -> str:
    # orjson refuses lone surrogates; a log line must never fail to be written.
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def setup_logging(log_format: str = "text", level: str = "INFO") -> None:
    """Log to stderr in `log_format` (FANOUT_LOG_FORMAT: `text` or `json`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # aiohttp logs every request at INFO; the token may be in a query string.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
