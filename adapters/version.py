"""The installed code version, recorded in every manifest and part of every stage fingerprint."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gplflow")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
