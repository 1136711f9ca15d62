"""The session state machine (common/store/lifecycle.py) against a model written from SPEC §5."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from common.store import lifecycle
from common.store.lifecycle import FINAL, OPEN, SETTABLE, STATUSES

# SPEC §5, edge by edge: pending -> running (first message, or PATCH) <-> paused;
# pending/running/paused -> completed | cancelled | failed; non-final -> expired.
SPEC_EDGES = {
    ("pending", "running"),
    ("running", "paused"),
    ("paused", "running"),
    *(
        (s, t)
        for s in ("pending", "running", "paused")
        for t in ("completed", "cancelled", "failed")
    ),
    *((s, "expired") for s in ("pending", "running", "paused")),
}


def test_every_pair_is_allowed_exactly_when_spec_lists_it() -> None:
    for current, target in itertools.product(sorted(STATUSES), repeat=2):
        assert lifecycle.can_change(current, target) == ((current, target) in SPEC_EDGES), (
            current,
            target,
        )


def test_status_sets() -> None:
    assert {"pending", "running", "paused"} == OPEN
    assert {"completed", "cancelled", "failed", "expired"} == FINAL
    assert "expired" not in SETTABLE and "pending" not in SETTABLE
    assert SETTABLE | {"pending", "expired"} == STATUSES


@pytest.mark.parametrize("final", sorted(FINAL))
def test_nothing_leaves_a_final_state(final: str) -> None:
    assert not any(lifecycle.can_change(final, t) for t in STATUSES)
    assert lifecycle.after_message(final) == final


def test_first_message_starts_a_pending_session_only() -> None:
    assert lifecycle.after_message("pending") == "running"
    assert lifecycle.after_message("running") == "running"
    assert lifecycle.after_message("paused") == "paused"


def test_assistant_replies_only_to_users_in_running_ai_sessions() -> None:
    for status, agent, role in itertools.product(
        sorted(STATUSES), ("ai", "human"), ("user", "agent", "assistant")
    ):
        expected = (status, agent, role) == ("running", "ai", "user")
        assert lifecycle.takes_assistant_reply(status, agent, role) == expected


class SessionModel(RuleBasedStateMachine):
    """Random walks of PATCHes, messages and sweeps; the rules must agree with the model."""

    def __init__(self) -> None:
        super().__init__()
        self.status = "pending"
        self.history = ["pending"]

    @rule(wanted=st.sampled_from(sorted(SETTABLE)))
    def patch(self, wanted: str) -> None:
        legal = (self.status, wanted) in SPEC_EDGES
        assert lifecycle.can_change(self.status, wanted) == legal
        assert (self.status in lifecycle.allowed_from(wanted)) == legal
        if legal:
            self.status = wanted
            self.history.append(wanted)

    @rule()
    def message(self) -> None:
        after = lifecycle.after_message(self.status)
        expected = "running" if self.status == "pending" else self.status
        assert after == expected
        if after != self.status:
            self.history.append(after)
        self.status = after

    @precondition(lambda self: self.status in OPEN)
    @rule()
    def sweep(self) -> None:
        assert lifecycle.can_change(self.status, "expired")
        self.status = "expired"
        self.history.append("expired")

    @invariant()
    def walk_follows_spec(self) -> None:
        assert self.history[0] == "pending"
        assert "pending" not in self.history[1:], "nothing returns to pending"
        finals = [s for s in self.history if s in FINAL]
        assert len(finals) <= 1 and (not finals or self.history[-1] == finals[0])
        for a, b in itertools.pairwise(self.history):
            assert (a, b) in SPEC_EDGES


TestSessionModel = SessionModel.TestCase
