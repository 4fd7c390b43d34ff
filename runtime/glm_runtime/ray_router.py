"""Conversation-affine request routing for the Ray Serve deployment (:mod:`glm_runtime.ray_app`).

Why: a replica that served turn *k* of a conversation holds that conversation's KV prefix (in its prefix cache,
when the scheduler has one); sending turn *k + 1* anywhere else prefills the whole history again. Serve's
default router (power of two choices) ignores this. This router sends every request of one conversation to the
same replica and falls back to the least-loaded one when that replica is gone, full or far busier than the rest.

The conversation is named by the ``x-session-id`` HTTP header (Serve's session header: its HTTP proxy puts it on
``RequestMetadata.session_id`` before routing; ``RAY_SERVE_SESSION_ID_HEADER_KEY`` renames it). The request body
is not readable at routing time (the proxy streams it to the chosen replica afterwards), so a prefix hash of the
messages cannot be used here: clients name their conversation (the ``openai`` client: ``default_headers`` per
conversation, or ``extra_headers`` per call). Requests without the header are routed least-loaded.

Choice for a conversation, in order:
1. the replica it last went to, if that replica is still running (remembered per router, LRU-bounded);
2. else the replica rendezvous hashing picks (so several Serve HTTP proxies, each with its own router, agree on
   a new conversation's replica without talking to each other);
3. the others, least loaded first, as the fallback rank: Serve tries them when the first rank rejects (its
   queue is at ``max_ongoing_requests``), and we go straight to them when the preferred replica's queue is over
   the least-loaded one's by more than ``imbalance_threshold``.

Only the public ``ray.serve.request_router`` API is used (alpha in Ray 2.60, hence the narrow ``ray`` pin).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

log = logging.getLogger("glm_runtime.ray_router")

#: Default for ``imbalance_threshold``: a whole scheduler batch more waiting than the least-loaded replica.
DEFAULT_IMBALANCE = 8
#: Conversations remembered per router (oldest forgotten first; a forgotten one is hashed again).
DEFAULT_MAX_SESSIONS = 100_000


def rendezvous(session: str, replicas: list[RunningReplica]) -> RunningReplica:
    """The replica with the highest hash of (session, replica id): stable across processes and restarts, and
    only the sessions of a removed replica move when the set changes."""
    def score(r: RunningReplica) -> bytes:
        return hashlib.blake2b(f"{session}\0{r.replica_id.unique_id}".encode(), digest_size=8).digest()
    return max(replicas, key=score)


class ConversationAffinityRouter(RequestRouter):
    """Routes the turns of one conversation (``x-session-id``) to one replica; least-loaded otherwise."""

    def initialize_state(self, imbalance_threshold: int = DEFAULT_IMBALANCE,
                         max_sessions: int = DEFAULT_MAX_SESSIONS, **kwargs: Any) -> None:
        if imbalance_threshold < 0 or max_sessions < 1:
            raise ValueError(f"need imbalance_threshold >= 0 and max_sessions >= 1, got {imbalance_threshold}, "
                             f"{max_sessions}")
        self.imbalance_threshold, self.max_sessions = imbalance_threshold, max_sessions
        self.sessions: OrderedDict[str, ReplicaID] = OrderedDict()
        #: Routing decisions, for tests and the load test: affine (went where the session was), moved (had a
        #: replica, went elsewhere), new (first turn), anonymous (no session header).
        self.counts = {"affine": 0, "moved": 0, "new": 0, "anonymous": 0}

    def _queue_len(self, r: RunningReplica) -> int:
        q = self.replica_queue_len_cache.get(r.replica_id)
        return 0 if q is None else q

    def _least_loaded_first(self, replicas: list[RunningReplica]) -> list[RunningReplica]:
        shuffled = random.sample(replicas, len(replicas))  # equal queues: spread, don't pile on the first
        return sorted(shuffled, key=self._queue_len)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        session = pending_request.metadata.session_id if pending_request is not None else ""
        ranked = self._least_loaded_first(candidate_replicas)
        if not session:
            return [ranked]  # Serve probes the rank and takes the replica with the shortest queue
        by_id = {r.replica_id: r for r in candidate_replicas}
        known = self.sessions.get(session)
        preferred = by_id.get(known) if known is not None else None
        if preferred is None:
            preferred = rendezvous(session, candidate_replicas)
        least = ranked[0]
        if self._queue_len(preferred) - self._queue_len(least) > self.imbalance_threshold:
            return [ranked]
        return [[preferred], [r for r in ranked if r is not preferred]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        session = pending_request.metadata.session_id
        if not session:
            self.counts["anonymous"] += 1
            return
        before = self.sessions.pop(session, None)
        self.counts["new" if before is None else "affine" if before == replica_id else "moved"] += 1
        self.sessions[session] = replica_id
        while len(self.sessions) > self.max_sessions:
            self.sessions.popitem(last=False)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for s in [s for s, r in self.sessions.items() if r == replica_id]:
            del self.sessions[s]  # their KV died with the replica: hash them afresh
