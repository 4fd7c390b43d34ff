"""The conversation-affine router's choices, on fake replicas (no Ray instance): a conversation stays on its
replica, moves when that replica is gone or far busier, new conversations hash stably, anonymous requests go to
the least-loaded replica."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

pytest.importorskip("ray.serve")

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.request_router import PendingRequest, ReplicaID

from glm_runtime.ray_router import ConversationAffinityRouter, rendezvous

DEP = DeploymentID(name="GLMReplica", app_name="glm")


@dataclass
class FakeReplica:
    replica_id: ReplicaID
    max_ongoing_requests: int = 40


def replicas(n: int) -> list[FakeReplica]:
    return [FakeReplica(ReplicaID(f"r{i}", DEP)) for i in range(n)]


def request(session: str = "") -> PendingRequest:
    return PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(request_id="x", internal_request_id="y",
                                                                       session_id=session))


def router(imbalance: int = 8) -> ConversationAffinityRouter:
    r = ConversationAffinityRouter(DEP, DeploymentHandleSource.PROXY)
    r.initialize_state(imbalance_threshold=imbalance)
    return r


def choose(r: ConversationAffinityRouter, reps: list[FakeReplica], pr: PendingRequest) -> list[list[FakeReplica]]:
    return asyncio.get_event_loop().run_until_complete(r.choose_replicas(reps, pr))


@pytest.fixture(autouse=True)
def event_loop_for_futures() -> Iterator[None]:
    """PendingRequest makes an asyncio.Future when built: give it a loop, as Serve's router thread has."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield
    asyncio.set_event_loop(None)
    loop.close()


def test_a_conversation_stays_on_its_replica_and_falls_back() -> None:
    r, reps = router(), replicas(3)
    pr = request("conv-1")
    ranks = choose(r, reps, pr)
    first = ranks[0][0]
    assert first is rendezvous("conv-1", reps) and len(ranks) == 2 and first not in ranks[1]
    r.on_request_routed(pr, ReplicaID("r2", DEP), None)  # Serve's fallback put it elsewhere: follow the KV
    assert choose(r, reps, request("conv-1"))[0] == [reps[2]]
    r.on_request_routed(request("conv-1"), ReplicaID("r2", DEP), None)
    assert r.counts["affine"] == 1 and r.counts["new"] == 1

    r.replica_queue_len_cache.update(reps[2].replica_id, 20)  # far busier than the rest: least-loaded instead
    r.replica_queue_len_cache.update(reps[0].replica_id, 3)
    r.replica_queue_len_cache.update(reps[1].replica_id, 1)
    assert choose(r, reps, request("conv-1")) == [[reps[1], reps[0], reps[2]]]
    r.replica_queue_len_cache.update(reps[2].replica_id, 9)  # within the threshold: stay
    assert choose(r, reps, request("conv-1"))[0] == [reps[2]]

    r.on_replica_actor_died(reps[2].replica_id)  # its KV is gone: the conversation is hashed again
    assert "conv-1" not in r.sessions
    assert choose(r, reps[:2], request("conv-1"))[0] == [rendezvous("conv-1", reps[:2])]


def test_anonymous_requests_go_least_loaded() -> None:
    r, reps = router(), replicas(3)
    r.replica_queue_len_cache.update(reps[0].replica_id, 5)
    r.replica_queue_len_cache.update(reps[1].replica_id, 0)
    r.replica_queue_len_cache.update(reps[2].replica_id, 2)
    assert choose(r, reps, request()) == [[reps[1], reps[2], reps[0]]]
    r.on_request_routed(request(), reps[1].replica_id, None)
    assert r.counts["anonymous"] == 1 and not r.sessions


def test_rendezvous_is_stable_and_spreads() -> None:
    reps = replicas(4)
    picks = [rendezvous(f"s{i}", reps).replica_id.unique_id for i in range(400)]
    assert picks == [rendezvous(f"s{i}", list(reversed(reps))).replica_id.unique_id for i in range(400)]
    assert all(60 < picks.count(f"r{i}") < 140 for i in range(4))
    # removing a replica moves only its own sessions
    moved = [i for i in range(400) if picks[i] != "r3" and rendezvous(f"s{i}", reps[:3]).replica_id.unique_id
             != picks[i]]
    assert moved == []


def test_session_memory_is_bounded() -> None:
    r = ConversationAffinityRouter(DEP, DeploymentHandleSource.PROXY)
    r.initialize_state(max_sessions=2)
    for s in ("a", "b", "c"):
        r.on_request_routed(request(s), ReplicaID("r0", DEP), None)
    assert list(r.sessions) == ["b", "c"]
    with pytest.raises(ValueError):
        r.initialize_state(imbalance_threshold=-1)
