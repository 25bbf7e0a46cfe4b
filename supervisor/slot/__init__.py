"""The slot: one unit of serving capacity (an active engine and its shadows), run as a
table-driven machine. Start at :mod:`supervisor.slot.table` (what happens, when) and
:mod:`supervisor.slot.controller` (the one way in); the other modules do the work, and
see the slot through :mod:`supervisor.slot.core` (what a part may touch).

(Nothing is imported here: :mod:`supervisor.metrics` reads the table's phases, and the
controller reads the metrics.)"""
