"""fieldgate: the MQTT gateway daemon for offline field crews."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fieldgate")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
