"""Core's own plugins, registered through the same path as external ones (see ``runtime.BUILTIN_PLUGINS``)."""
