"""diffstudio-example: public names of the plugin (keep torch imports out of plugin.py)."""
