"""The installed version of cass, recorded in every checkpoint, model and experiment."""

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("cass")
except PackageNotFoundError:  # running from a source tree that was not installed
    VERSION = "0+unknown"
