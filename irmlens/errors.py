"""Errors that name the problem and the fix, so the CLI can print them without a traceback."""


class IrmlensError(Exception):
    """Base class for user-facing errors (bad input, missing assets, inconsistent runs)."""


class MissingAssetError(IrmlensError):
    pass


class ConfigError(IrmlensError):
    pass


class LexiconFormatError(IrmlensError):
    pass


class ModelPairError(IrmlensError):
    pass


class CorruptCacheError(IrmlensError):
    """A cache file does not match the checksum it was written with."""


class RunLockedError(IrmlensError):
    """Another irmlens process is working on the same run folder."""


class RemoteCodeError(IrmlensError):
    """A model folder asks to run its own Python code, and the config did not allow it."""


class DamagedFileError(IrmlensError, ValueError):
    """A file of a run folder does not match what its stage wrote, or cannot be read (a
    ValueError too, as the JSON decode errors it replaces were)."""


class ReadOnlyRunError(IrmlensError):
    """A folder irmlens would write (and lock first) cannot be written."""


class ForeignFilesError(IrmlensError):
    """irmlens would replace or remove a folder holding files it did not write."""


class UnverifiedRunError(IrmlensError):
    """A run folder has no completion records, so its files cannot be verified."""
