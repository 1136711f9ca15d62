"""node/ws/maskcheck.py: frame boundaries followed across reads; the first unmasked frame found."""

from __future__ import annotations

from common.wsframe import OP_PING, OP_TEXT
from node.ws.maskcheck import MaskCheck
from node.ws.socket import is_valid_close_code
from node.ws.upgrade import parse_last_seq
from tests.support.rawws import client_frame

# 7-bit, 16-bit and 64-bit lengths, a control frame, an empty one.
MASKED = [
    client_frame(OP_TEXT, b"x" * 5),
    client_frame(OP_TEXT, b"y" * 300),
    client_frame(OP_TEXT, b"z" * 70_000),
    client_frame(OP_PING, b""),
]


def _scan(stream: bytes, cut: int) -> int:
    """Offset of the first unmasked frame in `stream`, fed as reads of `cut` bytes."""
    check = MaskCheck()
    for start in range(0, len(stream), cut):
        found = check.first_unmasked(stream[start : start + cut])
        if found >= 0:
            return start + found
    return -1


def test_masked_frames_pass_whatever_the_reads_cut_them_into() -> None:
    stream = b"".join(MASKED * 2)
    for cut in (1, 2, 3, 7, 13, 1000, len(stream)):
        assert _scan(stream, cut) == -1, cut


def test_the_unmasked_frame_is_found_where_it_starts() -> None:
    before = b"".join(MASKED)
    stream = before + client_frame(OP_TEXT, b"bad", masked=False) + MASKED[0]
    assert _scan(stream, len(stream)) == len(before)
    for cut in (1, 3, 64):
        # Found in the read holding its second header byte: at or after where it starts.
        found = _scan(stream, cut)
        assert len(before) <= found <= len(before) + 1, cut


def test_last_seq_is_ascii_digits_up_to_2_53() -> None:
    assert parse_last_seq("0") == 0
    assert parse_last_seq("007") == 7
    assert parse_last_seq(str(2**53)) == 2**53
    for bad in ("", "²", "①", "١", str(2**53 + 1), str(2**64), "-1", "1.0", "9" * 40):
        assert parse_last_seq(bad) is None, bad


def test_close_codes_a_peer_may_send() -> None:
    valid = [0, 1000, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999]
    invalid = [1, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535]
    assert all(is_valid_close_code(c) for c in valid)
    assert not any(is_valid_close_code(c) for c in invalid)
