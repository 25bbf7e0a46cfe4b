"""Slot records and fencing: every promotion is a transaction on ``slots/<slot>``
conditioned on the revision it was based on, so two promotions never take one epoch. Here
too: claims deferred while etcd is unreachable (written later only if nobody wrote the
slot meanwhile), hand-overs, and following the cluster's word (wake what it chose here,
step down where it chose someone else)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from supervisor.coordination.context import ClusterContext
from supervisor.coordination.etcd import (
    Compare,
    EtcdError,
    EtcdUnavailable,
    prefix_end,
    put_op,
)
from supervisor.coordination.local import ClaimRefused, SlotHandle
from supervisor.coordination.view import SlotRecord
from supervisor.model import EngineState


class SlotFencing:
    """Slot records, claims and their fencing, and following the cluster's word.

    ``demoted`` says whether this node serves nothing for now (policy demote: it claims
    nothing); ``lease`` is this node's lease (a leader's write requires its election key
    on it); ``unit_serving`` says whether a slot's unit serves on live nodes."""

    def __init__(
        self,
        ctx: ClusterContext,
        controllers: Mapping[str, SlotHandle],
        *,
        demoted: Callable[[], bool],
        lease: Callable[[], int],
        unit_serving: Callable[[str, str], bool],
    ) -> None:
        self.ctx = ctx
        self.etcd = ctx.etcd
        self.log = ctx.log
        self.metrics = ctx.metrics
        self.cl = ctx.cl
        self.node = ctx.node
        self.controllers = controllers
        self.demoted = demoted
        self.lease = lease
        self.unit_serving = unit_serving
        self.pending: dict[str, SlotRecord] = {}  # claims made while etcd was unreachable
        # ... and the slot's record as it was before the first of them: the deferred claim
        # is written only if nobody wrote the slot since (compare-and-set on it).
        self._pending_base: dict[str, SlotRecord | None] = {}
        self._pending_handover: dict[str, str] = {}  # slots handed over while etcd was down
        # Slots with a promotion or a step-down under way, here or by the leader (which
        # shares this set): nobody decides on a slot again until its action is over.
        self.acting: set[str] = set()

    async def claim(self, slot: str, unit: str, epoch: int, reason: str) -> int | None:
        if self.demoted():
            self.metrics.cluster_promotions.labels(slot, "fenced").inc()
            raise ClaimRefused("this node is demoted (its lease is unrenewed; policy demote)")
        rec = self.ctx.view.slots.get(slot)
        if self._moved_past(slot, unit, epoch, rec, "claim refused: the slot is at a newer epoch"):
            return None
        current = rec.epoch if rec else 0
        new = SlotRecord(max(current, epoch) + 1, unit, [self.node], self.node, reason)
        for _ in range(3):
            ok = await self.write_slot(slot, rec, new)
            if ok is None:  # etcd unreachable
                if self.cl.etcd_unreachable == "keep-serving":  # (demote: refused above)
                    self._pending_base.setdefault(slot, rec)
                    self.pending[slot] = new
                    self._pending_handover.pop(slot, None)  # served here again after all
                    self.metrics.cluster_promotions.labels(slot, "deferred").inc()
                    self.log.warning(
                        "etcd unreachable: promoting on this node now, recording the epoch "
                        "when etcd is back (policy keep-serving)",
                        slot=slot,
                        unit=unit,
                        epoch=new.epoch,
                    )
                    return new.epoch
                self.metrics.cluster_promotions.labels(slot, "fenced").inc()
                raise ClaimRefused(
                    f"etcd is unreachable (policy {self.cl.etcd_unreachable}): "
                    "promoting once it is back"
                )
            if ok:
                return new.epoch
            # Our copy was stale. Re-read: go on only if the slot has not moved past us.
            rec = await self.read_slot(slot)
            if self._moved_past(slot, unit, epoch, rec, "claim fenced: another promotion won"):
                return None
            new.epoch = (rec.epoch if rec else 0) + 1
        return None

    def _moved_past(
        self, slot: str, unit: str, epoch: int, rec: SlotRecord | None, why: str
    ) -> bool:
        """Whether the slot is already at a later epoch naming someone else (then we are
        fenced: counted and logged)."""
        if rec is None or rec.epoch <= epoch or rec.active == unit:
            return False
        self.metrics.cluster_promotions.labels(slot, "fenced").inc()
        self.log.warning(
            why, slot=slot, unit=unit, ours=epoch, cluster=rec.epoch, active=rec.active, by=rec.by
        )
        return True

    def served_elsewhere(self, slot: str) -> str | None:
        rec = self.ctx.view.slots.get(slot)
        if rec is None or rec.active is None:
            return None
        members = self.ctx.view.unit_members(slot, rec.active)
        if not members or all(m.get("node") == self.node for m in members):
            return None
        if self.unit_serving(slot, rec.active):
            return rec.active
        return None

    async def write_slot(
        self, slot: str, seen: SlotRecord | None, new: SlotRecord, leader_check: bool = False
    ) -> bool | None:
        """The fencing transaction. True: written; False: the key moved; None: no etcd."""
        return await self.write_slots([(slot, seen, new)], leader_check)

    async def write_slots(
        self, writes: list[tuple[str, SlotRecord | None, SlotRecord]], leader_check: bool = False
    ) -> bool | None:
        """The fencing transaction of one slot, or of several together (a lost node's
        slots: one raft entry and one watch message to every node instead of one each):
        every record is written only if no slot moved since it was ``seen`` (and, with
        ``leader_check``, this node still leads). True: all written; False: a key moved
        (none written); None: no etcd."""
        cmp = [
            Compare(self.ctx.key("slots", slot), "MOD", "EQUAL", seen.mod_revision)
            if seen is not None
            else Compare(self.ctx.key("slots", slot), "VERSION", "EQUAL", 0)
            for slot, seen, _ in writes
        ]
        if leader_check:
            # A deposed leader (its election key gone) cannot promote, nor can a node that
            # only believes it leads: every election key must be as young as ours or younger.
            ours = self.ctx.view.election.get(self.node, 0)
            prefix = self.ctx.key("election", "")
            cmp += [
                Compare(self.ctx.key("election", self.node), "LEASE", "EQUAL", self.lease()),
                Compare(prefix, "CREATE", "GREATER", ours - 1, range_end=prefix_end(prefix)),
            ]
        puts = [put_op(self.ctx.key("slots", slot), new.as_json()) for slot, _, new in writes]
        try:
            res = await self.etcd.txn(cmp, puts)
        except EtcdUnavailable:
            return None
        except EtcdError as e:
            self.log.error("fencing transaction failed", slots=[w[0] for w in writes], error=str(e))
            return False
        if res.succeeded:
            for slot, _, new in writes:
                new.mod_revision = res.revision
                self.ctx.view.set_slot(slot, new)
                self.metrics.cluster_promotions.labels(slot, "committed").inc()
                self.log.info(
                    "epoch committed in etcd",
                    slot=slot,
                    epoch=new.epoch,
                    active=new.active,
                    revision=res.revision,
                    reason=new.reason,
                )
        return res.succeeded

    async def read_slot(self, slot: str) -> SlotRecord | None:
        try:
            kv = await self.etcd.get(self.ctx.key("slots", slot))
        except EtcdError:
            return self.ctx.view.slots.get(slot)
        if kv is None:
            self.ctx.view.drop_slot(slot)
            return None
        try:
            rec = SlotRecord.parse(kv)
        except (ValueError, TypeError, AttributeError) as e:
            # Writes conditioned on an absent key fail while it is there: nothing is
            # promoted over a key nobody can read. It needs fixing by hand.
            self.ctx.bad_key(f"slots/{slot}: {e}")
            self.ctx.view.drop_slot(slot)
            return None
        self.ctx.view.set_slot(slot, rec)
        return rec

    async def flush_pending(self) -> None:
        """Record claims made while etcd was unreachable, each conditioned on the slot's
        record being what it was before them: if another node took the slot meanwhile
        (the leader promoted it elsewhere), our claim loses, whatever its epoch, and the
        reconcile loop steps our engine down."""
        for slot, new in list(self.pending.items()):
            base = self._pending_base.get(slot)
            ok = await self.write_slot(slot, base, new)
            if ok is None:
                return  # still unreachable: the next flush tries again
            if ok:
                ctl = self.controllers.get(slot)
                if ctl is not None:
                    ctl.confirm_epoch(new.epoch)
            elif (rec := await self.read_slot(slot)) is not None and rec.active == new.active:
                # A claim whose answer timed out may have been written after all.
                self.log.info("our promotion during the etcd outage is recorded", slot=slot)
            else:
                self.log.warning(
                    "our promotion during the etcd outage lost: the slot moved on",
                    slot=slot,
                    ours=new.active,
                    cluster=rec.active if rec else None,
                    epoch=rec.epoch if rec else None,
                )
            self.pending.pop(slot, None)
            self._pending_base.pop(slot, None)
        for slot, reason in list(self._pending_handover.items()):
            del self._pending_handover[slot]
            ctl = self.controllers.get(slot)
            if ctl is not None and ctl.active_engine() is None:
                await self.read_slot(slot)  # the record as it is now
                await self.hand_over(slot, reason)
        self.ctx.kick()

    async def hand_over(self, slot: str, reason: str) -> None:
        """The owner has no shadow left: clear the slot's active so the leader promotes a
        shadow on another node."""
        rec = self.ctx.view.slots.get(slot)
        ctl = self.controllers.get(slot)
        if rec is None or ctl is None:
            return
        ours = rec.active in {e.unit for e in ctl.engines.values()} or self.node in rec.nodes
        if rec.active is not None and not ours:
            return  # not ours to hand over (its dead engine may have left ctl.engines)
        new = SlotRecord(rec.epoch, None, [], self.node, reason)
        self.log.info("no shadow left here: handing the slot to the cluster", slot=slot)
        if await self.write_slot(slot, rec, new) is None:
            # etcd unreachable: handed over once it answers (unless this node serves the
            # slot again by then), or the leader would never hear of it.
            self._pending_handover[slot] = reason
            self.log.warning("etcd unreachable: the hand-over is made once it is back", slot=slot)

    def reconcile(self, tg: Any) -> None:
        """Follow the cluster's word on our slots: wake what it chose here, step down where
        it chose someone else."""
        for name, ctl in self.controllers.items():
            rec = self.ctx.view.slots.get(name)
            if rec is None or rec.active is None or name in self.acting:
                continue
            ours = [e for e in ctl.engines.values() if e.unit == rec.active]
            active = ctl.active_engine()
            if active is not None and active.unit != rec.active:
                if name in self.pending:
                    continue  # our own claim, not yet recorded
                # etcd names another unit: step down, whatever epoch we hold (one restored
                # from the state file may be higher than etcd's without being real).
                self.acting.add(name)
                tg.start_soon(self._act, name, ctl.step_down(rec.epoch, rec.active))
                continue
            if rec.epoch < ctl.epoch:
                continue
            sleeping = [e for e in ours if e.state is EngineState.SLEEPING]
            if sleeping and active is None:
                self.acting.add(name)
                tg.start_soon(
                    self._act, name, ctl.promote_assigned(sleeping[0].id, rec.epoch, rec.reason)
                )
            elif rec.epoch > ctl.epoch and active is not None and active.unit == rec.active:
                ctl.confirm_epoch(rec.epoch)  # e.g. the leader claimed our started group

    async def _act(self, slot: str, action: Any) -> None:
        """Carry out the cluster's word on one slot (a promotion here, a step-down). One
        that raises is a bug: logged with its traceback and contained, not the end of the
        coordinator (and with it of the daemon and every other slot); the next reconcile
        looks at the slot again."""
        try:
            await action
        except Exception as e:
            self.log.error("the cluster's action on the slot failed", slot=slot, exc_info=e)
        finally:
            self.acting.discard(slot)
            self.ctx.kick()
