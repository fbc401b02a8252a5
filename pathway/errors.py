"""Exceptions raised by pathway.

Every error a user can trigger is a named subclass of :class:`PathwayError` (itself a
``ValueError``), and its message says what went wrong, where (layer names, shapes, options) and
how to fix it. Nothing is half-applied: ``connect`` validates the whole plan before it touches
the model.
"""

from __future__ import annotations


class PathwayError(ValueError):
    """Base class of every error raised by pathway."""


class OptionError(PathwayError):
    """An unknown option, or an option value outside the allowed set."""


class TraceError(PathwayError):
    """A model's forward could not be read (neither torch.fx nor the runtime recorder)."""


class NoPairsError(PathwayError):
    """Matching found no target weight with a counterpart in the aux model."""


class DepthMismatchError(PathwayError):
    """Target and aux have different numbers of blocks under the ``equal`` depth policy."""


class ShapeMismatchError(PathwayError):
    """Paired weights have different shapes and ``on_shape_mismatch='error'``."""


class GroupSizeError(PathwayError):
    """Fused and split groups (e.g. qkv <- q, k, v) whose member sizes do not add up."""


class CompetingPairsError(PathwayError):
    """One target weight would receive two different aux weights (shared or tied target weights)."""


class SelfConnectionError(PathwayError):
    """The aux model is the target itself, or shares parameters with it."""


class DeviceMismatchError(PathwayError):
    """The aux model lives on another device or in another dtype than the target."""


class NotConnectedError(PathwayError):
    """An operation that needs pathways (fold, save) was called on a plain model."""


class CoverageError(PathwayError):
    """Some target body weights were left without a counterpart and partial coverage was not allowed."""


class LayoutError(PathwayError):
    """The row layout of a fused attention projection (``[q | k | v]`` or per head) could not be read."""


class NonFiniteError(PathwayError):
    """An aux tensor or a merged weight holds NaN or inf values."""
