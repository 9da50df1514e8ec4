# Loads the sd-vram pytest plugin (--gpu and the archived-results regression) when sd-vram is
# not installed, e.g. from a bare checkout on a GPU machine. An installed sd-vram registers the
# same module through its pytest11 entry point under this exact name, and pytest skips a
# pytest_plugins entry already registered under its name, so it is never loaded twice.
import importlib.util

if importlib.util.find_spec("sd_vram") is not None:
    pytest_plugins = ["sd_vram.plugin.pytest_plugin"]
