"""The message state machine, stated here independently of the table it checks."""

from __future__ import annotations

import itertools

import pytest

from pipeline.records.ledger.states import MESSAGE_TRANSITIONS, MessageState

# Every move a message may make, written out by hand from the README's ledger section.
ALLOWED = {
    ("planned", "sending"), ("planned", "suppressed"), ("planned", "failed"),
    ("sending", "accepted"), ("sending", "deferred"), ("sending", "bounced"),
    ("sending", "fallback"), ("sending", "failed"),
    ("deferred", "sending"), ("deferred", "expired"), ("deferred", "suppressed"),
    ("deferred", "failed"),
    ("accepted", "bounced"), ("accepted", "delivered"),
}  # fmt: skip
STATES = {"planned", "sending", "accepted", "deferred", "bounced", "fallback", "expired",
          "delivered", "suppressed", "failed"}  # fmt: skip


def test_the_states_are_the_documented_ones():
    assert {s.value for s in MessageState} == STATES


@pytest.mark.parametrize(
    ("from_state", "to_state"), list(itertools.product(sorted(STATES), repeat=2))
)
def test_a_move_is_allowed_exactly_when_documented(from_state, to_state):
    allowed = MessageState(to_state) in MESSAGE_TRANSITIONS[MessageState(from_state)]
    assert allowed == ((from_state, to_state) in ALLOWED)
