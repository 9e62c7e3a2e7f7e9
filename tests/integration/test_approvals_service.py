"""The approvals service on both stores (memory, and a real redis-server shared by two
"replicas"): who may decide, quorum, denial, expiry, slow_down, single redemption, and what
the audit trail keeps (never the agent's auth_req_id)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.approvals import (
    AlreadyDecided,
    ApprovalDenied,
    ApprovalExpired,
    ApprovalNotFound,
    ApprovalPending,
    ApprovalRecord,
    ApprovalService,
    ApprovalState,
    Delivery,
    NotEligible,
    SlowDown,
    reference,
)
from broker.approvals.store import InMemoryApprovalStore
from broker.approvals.store_redis import RedisApprovalStore
from broker.audit import DecisionLog, MemorySink
from broker.clock import FrozenClock
from broker.policy import Person, Policy
from broker.policy.approvals import ApprovalRequirement
from broker.policy.loader import load_policy
from broker.state_redis import RedisStateStore
from broker.types import Provenance, Sensitive, TokenType
from tests.support.servers import RedisServer, run_redis

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
ALICE = Person("dev", "alice", frozenset({"support"}))
DAVE = Person("dev", "dave", frozenset({"support-leads"}))
CAROL = Person("dev", "carol", frozenset({"finance"}))
FRANK = Person("dev", "frank", frozenset({"finance"}))
ERIN = Person("dev", "erin")
CHAIN = ("triage-agent",)


@pytest.fixture(scope="module")
def policy() -> Policy:
    return load_policy(ROOT / "policies").policy


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with run_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@dataclass
class Kit:
    service: ApprovalService
    other: ApprovalService
    """A second replica (the same store)."""
    clock: FrozenClock
    sink: MemorySink


@pytest.fixture(params=["memory", "redis"])
async def kit(
    request: pytest.FixtureRequest, policy: Policy, redis_server: RedisServer
) -> AsyncIterator[Kit]:
    clock = FrozenClock()
    sink = MemorySink()
    decisions = DecisionLog([sink], clock)
    states: list[RedisStateStore] = []
    if request.param == "memory":
        store = InMemoryApprovalStore(clock)
        stores = [store, store]
    else:
        prefix = f"test-{uuid.uuid4().hex[:12]}:"
        states = [RedisStateStore(redis_server.url, clock=clock, key_prefix=prefix) for _ in "ab"]
        stores = [RedisApprovalStore(s, clock) for s in states]
    services = [
        ApprovalService(s, policy=lambda: policy, decisions=decisions, clock=clock) for s in stores
    ]
    try:
        yield Kit(services[0], services[1], clock, sink)
    finally:
        for state in states:
            await state.close()


def requirement(
    rule: str = "refunds-need-finance",
    *,
    consent: bool = False,
    approvers: tuple[str, ...] = ("group:dev/finance",),
    quorum: int = 1,
    expiry: int = 300,
) -> ApprovalRequirement:
    return ApprovalRequirement(
        rule=rule,
        permissions=("tickets:refund",),
        consent=consent,
        approvers=approvers,
        quorum=quorum,
        request_expiry_seconds=expiry,
        token_lifetime_seconds=300,
        channels=(),
    )


async def open_request(
    service: ApprovalService, clock: FrozenClock, *requirements: ApprovalRequirement
) -> tuple[str, ApprovalRecord]:
    return await service.open(
        client_id="triage-agent",
        person=DAVE,
        provenance=Provenance(
            "dev",
            "dave",
            frozenset({"support-leads"}),
            None,
            TokenType.ID_TOKEN,
            int(clock.now()) + 3600,
        ),
        agent_chain=CHAIN,
        scopes=("tickets:read", "tickets:refund"),
        audiences=("https://tickets.internal.example",),
        requirements=requirements or (requirement(),),
        binding_message="Refund 120 EUR on order 4711",
        authorization_details=[{"type": "refund", "amount": "120.00", "currency": "EUR"}],
        requested_expiry=None,
        parent=None,
        policy_version="v1",
        delivery=Delivery(),
        notification_token=Sensitive("client-notification-token"),
        request_id="req-1",
    )


async def test_eligible_approver_sees_and_approves_then_the_agent_redeems_once(kit: Kit) -> None:
    auth_req_id, record = await open_request(kit.service, kit.clock)
    assert record.id == reference(auth_req_id) and auth_req_id not in record.to_json()
    assert [r.id for r in await kit.other.pending_for(CAROL)] == [record.id]
    assert await kit.other.pending_for(ERIN) == []
    assert await kit.other.pending_for(DAVE) == []  # the person, on a non-consent rule

    with pytest.raises(ApprovalPending):
        await kit.service.poll(auth_req_id, "triage-agent")
    decided = await kit.other.decide(record.id, CAROL, approve=True, comment=" ok ", via="web")
    assert decided.state is ApprovalState.APPROVED and decided.approvers == ("dev/carol",)
    assert decided.votes[0].comment == "ok"
    assert await kit.service.pending_for(CAROL) == []  # decided elsewhere: gone from the list

    kit.clock.advance(6)  # past the poll interval
    redeemed = await kit.service.poll(auth_req_id, "triage-agent")
    assert redeemed.state is ApprovalState.REDEEMED
    assert redeemed.authorization_details == [
        {"type": "refund", "amount": "120.00", "currency": "EUR"}
    ]
    kit.clock.advance(6)
    with pytest.raises(ApprovalNotFound):
        await kit.other.poll(auth_req_id, "triage-agent")

    events = [r["event"] for r in kit.sink.records if r["event"].startswith("approval.")]
    assert events == ["approval.requested", "approval.approved"]
    kit.service.record_redeemed(redeemed, "jti-1", "req-2")
    assert kit.sink.records[-1]["jti"] == "jti-1"
    assert auth_req_id not in json.dumps(kit.sink.records)  # only the agent ever holds it
    assert "client-notification-token" not in json.dumps(kit.sink.records)


async def test_separation_of_duties_and_refusals(kit: Kit) -> None:
    _, record = await open_request(kit.service, kit.clock)
    with pytest.raises(NotEligible) as refused:
        await kit.service.decide(record.id, DAVE, approve=True, comment=None, via="api")
    assert refused.value.reason == "self_approval"
    with pytest.raises(NotEligible) as refused:
        await kit.service.get_for(record.id, ERIN)
    assert refused.value.reason == "not_eligible"
    agent = Person("dev", "triage-agent", frozenset({"finance"}))  # named like an agent
    with pytest.raises(NotEligible) as refused:
        await kit.service.decide(record.id, agent, approve=True, comment=None, via="api")
    assert refused.value.reason == "in_agent_chain"
    assert (await kit.service.get_for(record.id, CAROL)).id == record.id
    with pytest.raises(ApprovalNotFound):
        await kit.service.get_for("apr_" + "0" * 32, CAROL)
    assert [r["reason"] for r in kit.sink.records if r["event"] == "approval.refused"] == [
        "self_approval",
        "in_agent_chain",
    ]


async def test_consent_rule_lets_the_person_approve(kit: Kit) -> None:
    consent = ApprovalRequirement(
        "close-tickets-consent", ("tickets:close",), True, (), 1, 300, 600, ()
    )
    auth_req_id, record = await open_request(kit.service, kit.clock, consent)
    assert [r.id for r in await kit.service.pending_for(DAVE)] == [record.id]
    with pytest.raises(NotEligible):
        await kit.service.decide(record.id, CAROL, approve=True, comment=None, via="web")
    decided = await kit.service.decide(record.id, DAVE, approve=True, comment=None, via="web")
    assert decided.state is ApprovalState.APPROVED
    assert (await kit.service.poll(auth_req_id, "triage-agent")).state is ApprovalState.REDEEMED


async def test_quorum_counts_distinct_people_and_each_rule(kit: Kit) -> None:
    two = requirement(quorum=2)
    auth_req_id, record = await open_request(kit.service, kit.clock, two)
    first = await kit.service.decide(record.id, CAROL, approve=True, comment=None, via="web")
    assert first.state is ApprovalState.PENDING and first.outstanding() == {
        "refunds-need-finance": 1
    }
    with pytest.raises(AlreadyDecided):  # the same person twice never makes a quorum
        await kit.other.decide(record.id, CAROL, approve=True, comment=None, via="api")
    assert await kit.service.pending_for(CAROL) == []
    assert [r.id for r in await kit.service.pending_for(FRANK)] == [record.id]
    second = await kit.other.decide(record.id, FRANK, approve=True, comment=None, via="api")
    assert second.state is ApprovalState.APPROVED and second.approvers == (
        "dev/carol",
        "dev/frank",
    )
    assert (await kit.service.poll(auth_req_id, "triage-agent")).state is ApprovalState.REDEEMED


async def test_concurrent_votes_from_two_replicas_both_count_once(kit: Kit) -> None:
    auth_req_id, record = await open_request(kit.service, kit.clock, requirement(quorum=2))
    results = await asyncio.gather(
        kit.service.decide(record.id, CAROL, approve=True, comment=None, via="web"),
        kit.other.decide(record.id, FRANK, approve=True, comment=None, via="api"),
    )
    assert sorted(r.state for r in results) == [ApprovalState.APPROVED, ApprovalState.PENDING]
    stored = await kit.service.store.load(record.id)
    assert stored is not None and sorted(stored.approvers) == ["dev/carol", "dev/frank"]
    redemptions = await asyncio.gather(
        kit.service.poll(auth_req_id, "triage-agent"),
        kit.other.poll(auth_req_id, "triage-agent"),
        return_exceptions=True,
    )
    assert sum(isinstance(r, ApprovalRecord) for r in redemptions) == 1
    assert all(isinstance(r, ApprovalRecord | SlowDown | ApprovalNotFound) for r in redemptions)


async def test_a_denial_decides(kit: Kit) -> None:
    auth_req_id, record = await open_request(kit.service, kit.clock, requirement(quorum=2))
    await kit.service.decide(record.id, CAROL, approve=True, comment=None, via="web")
    denied = await kit.service.decide(record.id, FRANK, approve=False, comment="no", via="web")
    assert denied.state is ApprovalState.DENIED
    with pytest.raises(ApprovalDenied):
        await kit.service.poll(auth_req_id, "triage-agent")
    with pytest.raises(ApprovalNotFound):  # decided: nothing left to decide
        await kit.service.decide(record.id, FRANK, approve=True, comment=None, via="web")


async def test_expiry(kit: Kit) -> None:
    auth_req_id, record = await open_request(kit.service, kit.clock, requirement(expiry=60))
    assert record.expires_at - record.created_at == 60
    kit.clock.advance(61)
    assert await kit.service.pending_for(CAROL) == []
    with pytest.raises(ApprovalNotFound):
        await kit.service.decide(record.id, CAROL, approve=True, comment=None, via="web")
    with pytest.raises(ApprovalExpired):
        await kit.service.poll(auth_req_id, "triage-agent")
    assert [r["event"] for r in kit.sink.records].count("approval.expired") == 1


async def test_slow_down_and_foreign_or_unknown_ids(kit: Kit) -> None:
    auth_req_id, record = await open_request(kit.service, kit.clock)
    with pytest.raises(ApprovalPending):
        await kit.service.poll(auth_req_id, "triage-agent")
    with pytest.raises(SlowDown) as slow:
        await kit.other.poll(auth_req_id, "triage-agent")
    assert slow.value.interval == record.interval + 5
    for client, req_id in (("coding-agent", auth_req_id), ("triage-agent", "x" * 43)):
        with pytest.raises(ApprovalNotFound):
            await kit.service.poll(req_id, client)
    with pytest.raises(ApprovalNotFound):  # the public reference does not redeem
        await kit.service.poll(record.id, "triage-agent")


async def test_record_json_round_trip_and_malformed() -> None:
    clock = FrozenClock()
    store = InMemoryApprovalStore(clock)
    service = ApprovalService(
        store,
        policy=lambda: load_policy(ROOT / "policies").policy,
        decisions=DecisionLog([MemorySink()], clock),
        clock=clock,
    )
    _, record = await open_request(service, clock)
    assert ApprovalRecord.from_json(record.to_json()) == record
    for bad in ("{}", "[]", "not json", json.dumps({**json.loads(record.to_json()), "state": "x"})):
        with pytest.raises(ValueError):
            ApprovalRecord.from_json(bad)
