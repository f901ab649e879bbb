"""Errors embplex raises. Every message says what the user can do next."""

from __future__ import annotations


class EmbplexError(Exception):
    """Base class of every error embplex raises on purpose."""


class UnknownComponentError(EmbplexError, KeyError):
    """A plugin name that no installed plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class OptionError(EmbplexError, TypeError):
    """An option a component does not take, or a value of the wrong kind.

    Plugins raise it from a factory to reject a bad option value; say which option, the
    value and what is allowed. The user sees one line naming the component.
    """


class PluginError(EmbplexError):
    """A plugin's factory failed with an error other than an :class:`EmbplexError`."""


class DuplicateComponentError(EmbplexError):
    """Two plugins registered the same name for the same kind, and that name was used."""


class UnsafeConfigError(EmbplexError):
    """A config asked for something embplex refuses to do (e.g. ``_target_``)."""


class InputError(EmbplexError, ValueError):
    """Texts that cannot be embedded: empty list, ``None``, non-strings, too long."""


class EmptyIndexError(InputError):
    """A search of an index that holds no vectors (none added yet, or all deleted)."""


class DimensionError(EmbplexError, ValueError):
    """Vectors whose width does not match the index or model."""


class NonFiniteError(EmbplexError, ArithmeticError):
    """A model produced NaN or infinite numbers where a result was expected."""


class ModelFileError(EmbplexError, OSError):
    """A saved model, checkpoint or index that is missing or corrupt."""


class OutputError(EmbplexError, OSError):
    """An output (embeddings, results, an index, a model) that cannot be written: a
    read-only folder, a full disk. Nothing is left half-written."""


class MissingPluginError(EmbplexError):
    """A saved model needs a plugin that is not installed."""


class CheckpointMismatchError(EmbplexError):
    """A checkpoint written by a run with a different configuration."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a training run; the message says where its last checkpoint is.

    A ``KeyboardInterrupt``, so code that handles interrupts keeps working.
    :attr:`checkpoint` is the checkpoint a rerun resumes from (``None``: none was written).
    """

    def __init__(self, message: str, checkpoint: "object | None" = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


class DeviceError(EmbplexError, ValueError):
    """A ``device`` this machine does not have (``cuda`` without a GPU, ``cuda:3`` on a
    one-GPU machine, ``mps`` off Apple silicon), or a form that is not a device."""


class OutOfMemoryError(EmbplexError, MemoryError):
    """The accelerator ran out of memory and embplex could not work around it."""


class DistributedError(EmbplexError, RuntimeError):
    """Data-parallel training could not go on: the process group did not start, or a
    collective failed (another process died, or did not answer within the timeout)."""
