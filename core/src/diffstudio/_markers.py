"""The pluggy markers. One name everywhere: project, markers and entry-point group are all ``diffstudio``."""

from __future__ import annotations

import pluggy

PROJECT_NAME = "diffstudio"
ENTRY_POINT_GROUP = "diffstudio"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
