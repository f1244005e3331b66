"""The errors kacq_hooks raises: one base class, a few precise subclasses."""
from __future__ import annotations


class KacqError(Exception):
    """Base class: every error kacq_hooks raises on purpose says what was found, expected and what to do."""


class LocateError(KacqError):
    """No MLP output projection could be found, or the model's MLP shape is not supported."""


class ShapeError(KacqError, ValueError):
    """A tensor, mask or plan does not fit the model or the statistics it is meant for."""


class ExpertIdError(ShapeError, IndexError):
    """A routed row names an expert outside the layer's ``0..experts - 1`` (its slots do not exist)."""


class MissingExtraError(KacqError, ImportError):
    """An optional integration was asked for but its package is not installed."""

    def __init__(self, package: str, extra: str, what: str):
        super().__init__(
            f"{what} needs the '{package}' package, which is not installed. "
            f"Install it with: pip install 'kacq_hooks[{extra}]'"
        )
        self.package = package
        self.extra = extra


class CorpusError(KacqError, ValueError):
    """A corpus, tokenizer setting or split cannot be used as asked (bad size, count or fraction)."""


class ConfigError(KacqError, ValueError):
    """An option or environment setting has a value kacq_hooks does not accept."""


class CheckpointError(KacqError):
    """Saved state cannot be restored: it is missing, from another run or model, or unreadable."""


class ArgumentTypeError(KacqError, TypeError):
    """An argument has a type the function cannot take."""


class ResuscitationError(KacqError):
    """A resuscitation cannot be applied as asked (e.g. the modules already carry one)."""


class FactDataError(KacqError, ValueError):
    """A fact record does not follow the schema; ``index`` and ``field`` say where (``None`` when not one record)."""

    def __init__(self, message: str, index: int | None = None, field: str | None = None):
        super().__init__(message)
        self.index = index
        self.field = field


class InjectionError(KacqError, ValueError):
    """A schedule or batch cannot take the requested injections."""


class TrajectoryError(KacqError, ValueError):
    """A trajectory file or step does not fit the store (other probes, a step already recorded, a broken file)."""


class ProbeTokenizationError(KacqError, ValueError):
    """A probe cannot be tokenized so that its target is a clean suffix (or at all)."""


class SAMError(KacqError, RuntimeError):
    """SAM's two passes were called out of order (e.g. a plain ``step()`` with no perturbation undone)."""


class FormatError(KacqError, ValueError):
    """A text or format cannot give what was asked (no text, unknown format name, too many variants)."""


class MetricError(KacqError, ValueError):
    """A trajectory or score cannot give the asked metric (missing steps, too few points, a zero baseline)."""


class UnknownKeyError(KacqError, KeyError):
    """A name (a reduction, a kind) is not one of those offered."""


class ExpertsError(LocateError):
    """A mixture-of-experts layer whose layout or experts implementation kacq_hooks cannot tap."""


class SavedStatsError(KacqError, ValueError):
    """A saved statistics file is missing, not kacq_hooks statistics, or belongs to another model."""


class AttributionError(KacqError, ValueError):
    """Attribution was asked for something it cannot compute (unknown method, bad slots or baseline, experts sites)."""


class NoTokensError(KacqError):
    """A result needs recorded tokens and the statistics hold none it can use (nothing recorded yet, or every
    coefficient of a layer was non-finite)."""


class StatisticsOverflowError(KacqError, ArithmeticError):
    """A running fp32 sum of finite coefficients overflowed: no statistic derived from it would be right."""


class SweepError(KacqError, RuntimeError):
    """A checkpoint sweep's engine cannot run its tasks (a Ray cluster that cannot be reached or joined)."""


class StateError(KacqError):
    """The instrumentation (or an intervention) is not in a state that allows this now: a step was skipped or came
    out of order (statistics combined across ranks and not reset, tensor-parallel slices not yet gathered, a layer
    run outside its model's forward, a backward with no forward, fp16 gradients without a declared loss scale).

    Not a ``RuntimeError``: several of these are raised inside hooks, where a caller's broad
    ``except RuntimeError`` (out-of-memory retries) must not swallow them."""


class BenchmarkError(KacqError, RuntimeError):
    """A benchmark's measuring child process failed; the message carries its last error line. Still a
    ``RuntimeError``, as this refusal was before 0.3 (it is never raised inside a hook)."""
