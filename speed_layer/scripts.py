"""Lua scripts that apply events' effects atomically with their dedup markers (exactly-once effects).

The Lua lives beside this file (`apply_events.lua`, `merge_identity.lua`, ...); each file's header
declares its KEYS and ARGV by name (common/lua.py), and effects.py builds both by those names.

On one Redis the whole script is atomic, so the dedup decision guards the per-person keys and the
global counters together. On Redis Cluster a script may only touch one slot: there the per-person part (all keys tagged
{u:<person>}) is one apply_events.lua call per person (its split mode), and the global counters
(trending, popularity, bestsellers, co-visitation, session-kNN) one apply_globals.lua call per slot
group `{g:<n>}`, guarded by the group's own marker of the event (effects.py states the guarantee).
An identify's merge, which spans the device's and the user's slots, is detach_device.lua in the
device's slot then merge_identity.lua in the user's, each guarded by its own marker.
"""

from __future__ import annotations

from common.lua import load_script

APPLY_EVENTS = load_script("speed_layer", "apply_events.lua")
APPLY_GLOBALS = load_script("speed_layer", "apply_globals.lua")
MERGE_IDENTITY = load_script("speed_layer", "merge_identity.lua")
DETACH_DEVICE = load_script("speed_layer", "detach_device.lua")
