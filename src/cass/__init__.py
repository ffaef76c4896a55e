"""cass: Cross-Architectural Self-Supervision for medical images.

The command-line tool ``cass`` is a thin layer over the functions re-exported here, so everything
it does can be done from a notebook.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cass")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0+unknown"
