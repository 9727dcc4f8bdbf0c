"""Lua scripts that apply events' effects atomically with their dedup markers (exactly-once effects).

The Lua lives beside this file (`apply_events.lua`, `merge_identity.lua`); each file's header
declares its KEYS and ARGV by name (common/lua.py), and effects.py builds both by those names.

On one Redis the whole script is atomic, so the dedup decision guards the per-person keys and the
global counters together. On Redis Cluster a script may only touch one slot: the per-person part
(all keys tagged {u:<person>}) would stay one script per person, and the global counters
(trending, popularity, bestsellers, co-visitation) would move to a second script per item slot
guarded by its own marker (e.g. `{i:<item>}:seen:<event_id>`).
"""

from __future__ import annotations

from common.lua import load_script

APPLY_EVENTS = load_script("speed_layer", "apply_events.lua")
MERGE_IDENTITY = load_script("speed_layer", "merge_identity.lua")
