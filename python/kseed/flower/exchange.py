"""The Flower side of the server loop: find which node holds which partition, and run one round's
message exchange with a timeout, counting the bytes that cross the wire.  No driver logic here: the
round loop is kseed.rounds', and exchange() is the `deliver` step it calls."""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Dict, Iterable, Mapping, Optional

from flwr.app import ConfigRecord, Message, RecordDict

from kseed.rounds import Delivery

from .common import DOWN_KEY, RECORD, TIMING_KEYS, UP_KEY, wire_bytes

log = logging.getLogger("kseed.flower")


def discover_partitions(grid, num_partitions: int, timeout: float, poll: float = 1.0) -> Dict[int, int]:
    """Ask every connected node for its node config; return {partition-id: node id}.

    Waits until every partition 0..num_partitions-1 has answered (or `timeout` seconds pass: then the
    partitions found so far are returned, and sampled partitions without a node count as no reply).
    A node whose num-partitions differs from the run's, or whose partition id is out of range, is
    ignored with a warning; two nodes claiming one partition: the first answer wins.
    """
    end = time.monotonic() + timeout
    asked: set = set()
    pending: Dict[str, int] = {}
    found: Dict[int, int] = {}
    while True:
        nodes = [n for n in grid.get_node_ids() if n not in asked]
        if nodes:
            msgs = [Message(RecordDict({RECORD: ConfigRecord({"op": "hello"})}), dst_node_id=n,
                            message_type="query", group_id="discover") for n in nodes]
            ids = list(grid.push_messages(msgs))
            for mid, n in zip(ids, nodes):
                if mid:
                    pending[mid] = n
            asked.update(nodes)
        if pending:
            for reply in grid.pull_messages(list(pending)):
                node = pending.pop(reply.metadata.reply_to_message_id, None)
                if node is None:
                    continue
                if reply.has_error():
                    log.warning("node %s: discovery failed: %s", node, reply.error.reason)
                    continue
                try:
                    rec = reply.content[RECORD]
                    pid, nparts = int(rec["partition-id"]), int(rec["num-partitions"])
                except (KeyError, TypeError, ValueError):
                    log.warning("node %s: malformed discovery reply, ignored", node)
                    continue
                if nparts != num_partitions or not 0 <= pid < num_partitions:
                    log.warning("node %s: partition-id=%s num-partitions=%s does not fit num-clients=%d; "
                                "ignored", node, pid, nparts, num_partitions)
                    continue
                if pid in found:
                    log.warning("node %s also claims partition %d (node %s has it); ignored", node, pid,
                                found[pid])
                    continue
                found[pid] = node
        if len(found) == num_partitions or time.monotonic() >= end:
            return found
        time.sleep(poll)


def exchange(grid, downs: Mapping[int, bytes], node_of: Mapping[int, int], round_idx: int, *,
             timeout: float, max_upload_bytes: int, fields: Optional[Mapping[str, Any]] = None) -> Delivery:
    """Send each client its DownMessage, collect the replies that arrive within `timeout` seconds:
    the engine-specific step of kseed.rounds' loop (uploads, wire bytes, client timings, drops).

    Replies that are errors (the ClientApp raised, or Flower reports the node unavailable), that lack the
    upload, whose upload is not bytes, or is larger than `max_upload_bytes` (0: no Flower-side limit)
    are dropped here and listed in `failed`; everything else goes to the driver, which validates again.
    `fields` are extra ConfigRecord entries sent with every DownMessage (e.g. the base model's hash).
    """
    t0 = time.monotonic()
    res = Delivery(uploads={}, sent=[], timings={}, wire_down=0, wire_up=0)
    cid_of: Dict[int, int] = {}
    msgs = []
    for cid, down in downs.items():
        node = node_of.get(cid)
        if node is None:
            res.failed[cid] = "no node holds this partition"
            continue
        rec = ConfigRecord({DOWN_KEY: bytes(down), **dict(fields or {})})
        msg = Message(RecordDict({RECORD: rec}), dst_node_id=node,
                      message_type="train", group_id=str(round_idx))
        res.wire_down += wire_bytes(msg)
        cid_of[node] = cid
        res.sent.append(cid)
        msgs.append(msg)
    replies: Iterable[Message] = grid.send_and_receive(msgs, timeout=timeout) if msgs else []
    # push_messages gave each message its id: replies name it in reply_to_message_id (error replies
    # made by the SuperLink for an unreachable node come from the SuperLink, not from that node).
    cid_of_msg = {m.metadata.message_id: cid_of[m.metadata.dst_node_id] for m in msgs}
    for reply in replies:
        cid = cid_of_msg.get(reply.metadata.reply_to_message_id)
        if cid is None or cid in res.uploads or cid in res.failed:
            continue
        if reply.has_error():
            res.failed[cid] = f"error reply: {reply.error.reason}"
            if reply.metadata.src_node_id == node_of[cid]:  # the node's own error crossed the wire
                res.wire_up += wire_bytes(reply)
            continue
        if reply.metadata.src_node_id != node_of[cid]:
            res.failed[cid] = f"reply from node {reply.metadata.src_node_id}, sent to {node_of[cid]}"
            continue
        res.wire_up += wire_bytes(reply)
        try:
            up = reply.content[RECORD][UP_KEY]
        except (KeyError, TypeError):
            res.failed[cid] = "reply without an upload"
            continue
        if not isinstance(up, bytes):
            res.failed[cid] = f"upload is {type(up).__name__}, not bytes"
            continue
        if max_upload_bytes and len(up) > max_upload_bytes:
            res.failed[cid] = f"upload of {len(up)} bytes exceeds max-upload-bytes={max_upload_bytes}"
            continue
        res.uploads[cid] = up
        res.timings[cid] = {k: float(v) for k, v in reply.content[RECORD].items()
                            if k in TIMING_KEYS and isinstance(v, float) and math.isfinite(v)}
    for cid in [c for c in res.sent if c not in res.uploads and c not in res.failed]:
        res.failed[cid] = f"no reply within {timeout:g} s"
    for cid, why in sorted(res.failed.items()):
        log.warning("round %d: client %d dropped: %s", round_idx, cid, why)
    res.seconds = time.monotonic() - t0
    return res
