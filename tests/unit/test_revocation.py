"""Revocation checks: lineage cascade, not-before, and the sub-second recheck window."""

from __future__ import annotations

import asyncio

import pytest

from broker.audit import DecisionLog, MemorySink
from broker.clock import FrozenClock
from broker.errors import InvalidRequest
from broker.revocation import RevocationRequest, Revocations, TokenRevoked
from broker.state import InMemoryStateStore, StateUnavailable
from broker.types import BrokerToken, Provenance, TokenType

PROVENANCE = Provenance("dev", "alice", frozenset(), None, TokenType.ID_TOKEN, 1_800_003_600)


def _token(jti: str, lineage: tuple[str, ...] = (), issued_at: int = 1_800_000_000) -> BrokerToken:
    return BrokerToken(
        jti=jti,
        subject="dev/alice",
        client_id="sub",
        scopes=frozenset(),
        audiences=(),
        actor_chain=("sub", "triage"),
        provenance=PROVENANCE,
        policy_version="v",
        issued_at=issued_at,
        expires_at=issued_at + 600,
        parent_jti=lineage[-1] if lineage else None,
        claims={},
        lineage=lineage,
    )


def _setup(recheck_after: float = 0.5) -> tuple[Revocations, InMemoryStateStore, FrozenClock]:
    clock = FrozenClock()
    state = InMemoryStateStore(clock)
    revocations = Revocations(
        state,
        clock,
        DecisionLog([MemorySink()], clock),
        max_token_lifetime=3600,
        recheck_after=recheck_after,
    )
    return revocations, state, clock


def test_revoking_an_ancestor_revokes_descendants_only() -> None:
    revocations, _, _ = _setup(recheck_after=0)
    child, sibling = _token("child", ("root", "parent")), _token("other", ("root2",))
    asyncio.run(revocations.revoke(RevocationRequest("token", "parent"), by="x", request_id="r"))
    with pytest.raises(TokenRevoked, match="derives from"):
        asyncio.run(revocations.check(child))
    asyncio.run(revocations.check(sibling))


def test_not_before_revokes_earlier_tokens_of_the_person_or_agent() -> None:
    revocations, _, clock = _setup(recheck_after=0)
    early = _token("early", issued_at=int(clock.now()) - 10)
    later = _token("later", issued_at=int(clock.now()) + 10)
    asyncio.run(revocations.revoke(RevocationRequest("agent", "triage"), by="x", request_id="r"))
    with pytest.raises(TokenRevoked):
        asyncio.run(revocations.check(early))
    asyncio.run(revocations.check(later))


def test_another_replicas_revocation_is_seen_within_the_recheck_window() -> None:
    revocations, state, clock = _setup(recheck_after=0.5)
    token = _token("t1")
    asyncio.run(revocations.check(token))  # remembered as not revoked for 0.5 s
    asyncio.run(state.revoke_tokens({"t1": clock.now() + 600}))  # written by another replica
    asyncio.run(revocations.check(token))  # still inside the window
    clock.advance(0.51)
    with pytest.raises(TokenRevoked):
        asyncio.run(revocations.check(token))


class _CountingState(InMemoryStateStore):
    def __init__(self, clock: FrozenClock) -> None:
        super().__init__(clock)
        self.lookups = 0
        self.epoch_reads = 0

    async def revocation_status(self, token_ids, subjects):  # type: ignore[no-untyped-def]
        self.lookups += 1
        return await super().revocation_status(token_ids, subjects)

    async def revocation_epoch(self) -> str:
        self.epoch_reads += 1
        return await super().revocation_epoch()


def test_many_people_cost_epoch_reads_not_lookups_until_someone_is_revoked() -> None:
    clock = FrozenClock()
    state = _CountingState(clock)
    replica = Revocations(state, clock, DecisionLog([MemorySink()], clock), max_token_lifetime=3600)
    other = Revocations(state, clock, DecisionLog([MemorySink()], clock), max_token_lifetime=3600)
    people = [f"dev/p{i}" for i in range(300)]

    async def exchanges() -> None:
        for person in people:
            await replica.check_exchange(
                person=person,
                subject_time=clock.now(),
                parent=None,
                actor="triage",
                actor_credential_time=None,
            )

    asyncio.run(exchanges())
    assert state.lookups == 300
    for _ in range(5):  # 2.5 s of traffic: the epoch is read again, nobody is looked up again
        clock.advance(0.5)
        asyncio.run(exchanges())
    assert state.lookups == 300
    assert state.epoch_reads == 6

    # Another replica revokes one person: within the window this replica refuses them, and
    # looks everyone up once more (the epoch moved).
    before = clock.now()
    clock.advance(1)
    asyncio.run(other.revoke(RevocationRequest("person", "dev/p7"), by="x", request_id="r"))
    clock.advance(0.5)
    with pytest.raises(TokenRevoked):
        asyncio.run(
            replica.check_exchange(
                person="dev/p7",
                subject_time=before,
                parent=None,
                actor="triage",
                actor_credential_time=None,
            )
        )
    people.remove("dev/p7")
    asyncio.run(exchanges())
    assert state.lookups == 300 + 1 + 299


def test_concurrent_checks_share_one_epoch_read_and_a_failed_read_fails_them_all() -> None:
    clock = FrozenClock()
    state = _CountingState(clock)
    revocations = Revocations(
        state, clock, DecisionLog([MemorySink()], clock), max_token_lifetime=3600
    )

    async def many() -> list[BaseException | None]:
        return await asyncio.gather(
            *(revocations.check(_token(f"t{i}")) for i in range(50)), return_exceptions=True
        )

    assert asyncio.run(many()) == [None] * 50
    assert state.epoch_reads == 1

    async def broken() -> str:
        raise StateUnavailable("down")

    state.revocation_epoch = broken  # type: ignore[method-assign]
    clock.advance(0.6)
    results = asyncio.run(many())
    assert all(isinstance(r, StateUnavailable) for r in results)  # fail closed, never cached


def test_a_local_revocation_holds_at_once_and_the_window_is_under_a_second() -> None:
    revocations, _, _ = _setup(recheck_after=0.5)
    token = _token("t2")
    asyncio.run(revocations.check(token))
    asyncio.run(revocations.revoke(RevocationRequest("token", "t2"), by="x", request_id="r"))
    with pytest.raises(TokenRevoked):
        asyncio.run(revocations.check(token))
    with pytest.raises(ValueError):
        _setup(recheck_after=1.0)


def test_person_and_agent_entries_live_for_the_whole_acceptance_window() -> None:
    clock = FrozenClock()
    state = InMemoryStateStore(clock)
    revocations = Revocations(
        state,
        clock,
        DecisionLog([MemorySink()], clock),
        max_token_lifetime=60,
        acceptance_window=400,  # e.g. a 60 s token + a 300 s leeway + ...
        recheck_after=0,
    )
    start = clock.now()
    asyncio.run(
        revocations.revoke(RevocationRequest("person", "dev/alice"), by="x", request_id="r")
    )
    ahead = RevocationRequest("agent", "triage", not_before=start + 30)  # a time still ahead
    asyncio.run(revocations.revoke(ahead, by="x", request_id="r"))
    keys = ["person:dev/alice", "agent:triage"]
    clock.advance(400)
    assert set(asyncio.run(state.revocation_status([], keys)).not_before) == set(keys)
    clock.advance(30)
    assert set(asyncio.run(state.revocation_status([], keys)).not_before) == {"agent:triage"}
    clock.advance(2)
    assert dict(asyncio.run(state.revocation_status([], keys)).not_before) == {}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 1_800_000_000.0 + 3601])
def test_an_unreasonable_not_before_is_refused_before_anything_changes(bad: float) -> None:
    revocations, state, _ = _setup(recheck_after=0)
    asyncio.run(
        revocations.revoke(RevocationRequest("person", "dev/alice"), by="x", request_id="r")
    )
    with pytest.raises(InvalidRequest, match="not_before"):
        asyncio.run(
            revocations.revoke(
                RevocationRequest("person", "dev/alice", not_before=bad), by="x", request_id="r"
            )
        )
    status = asyncio.run(state.revocation_status([], ["person:dev/alice"]))
    assert dict(status.not_before) == {"person:dev/alice": 1_800_000_000.0}


def test_exchange_check_fails_closed_without_a_time_and_weighs_agent_credentials() -> None:
    revocations, _, clock = _setup(recheck_after=0)  # maximum token lifetime: 3600 s
    start = clock.now()
    asyncio.run(
        revocations.revoke(RevocationRequest("person", "dev/alice"), by="x", request_id="r")
    )
    asyncio.run(revocations.revoke(RevocationRequest("agent", "wl"), by="x", request_id="r"))

    def check(person: str, subject_time: float | None, credential_time: float | None) -> None:
        asyncio.run(
            revocations.check_exchange(
                person=person,
                subject_time=subject_time,
                parent=None,
                actor="wl" if credential_time != -1 else "other",
                actor_credential_time=credential_time,
            )
        )

    for no_or_early_time in (None, start - 1):  # a token vouching for no time: fail closed
        with pytest.raises(TokenRevoked) as caught:
            check("dev/alice", no_or_early_time, -1)
        assert caught.value.code == "subject_revoked"
    check("dev/alice", start + 1, -1)
    check("dev/bob", None, -1)  # no entry, nothing to compare with

    with pytest.raises(TokenRevoked) as caught:
        check("dev/bob", start, start + 10)  # locked out: fresh credential or not
    assert caught.value.code == "agent_revoked"
    clock.advance(3600)
    with pytest.raises(TokenRevoked, match="issued before its revocation"):
        check("dev/bob", start, start - 5)  # e.g. a workload token from before
    check("dev/bob", start, start)
    check("dev/bob", start, None)  # a client secret, after the lockout


def test_the_acceptance_window_covers_tokens_assertions_sso_and_the_largest_leeway() -> None:
    from broker.services import SSO_HORIZON_SECONDS, acceptance_window
    from broker.settings import BrokerSettings

    settings = BrokerSettings(
        tokens={"max_lifetime_seconds": 200_000, "leeway_seconds": 10},
        identity_providers=[
            {
                "name": "corp",
                "kind": "oidc",
                "issuer": "https://idp.example",
                "client_ids": ["broker"],
                "leeway_seconds": 90,
            }
        ],
    )
    assert acceptance_window(settings) == 200_000 + 90
    short = BrokerSettings(tokens={"max_lifetime_seconds": 60, "leeway_seconds": 300})
    assert acceptance_window(short) == SSO_HORIZON_SECONDS + 300
