"""Saved statistics: one safetensors file per instrumentation, with a small JSON header; never pickle.

The file holds the running sums of every site (``{layer index}.{field}``, the keys of
:meth:`kacq_hooks.stats.CoefficientStats.state_dict`) and, in the safetensors metadata under
``"kacq_hooks"``, a JSON header: the sites (path, label, d_ff, kind, experts), the model type, the
kacq_hooks version, the weighting and the token counts. Because the file holds sums, not means, the
statistics saved by two processes over two shards of a dataset merge into those of one pass over both:

>>> import torch, kacq_hooks as kh                                  # doctest: +SKIP
>>> save_stats(inst_a, "shard0.safetensors"); save_stats(inst_b, "shard1.safetensors")  # doctest: +SKIP
>>> total = load_stats("shard0.safetensors", kh.instrument(model))  # doctest: +SKIP
>>> total.merge(load_stats("shard1.safetensors")).knowledge_entropy().total  # doctest: +SKIP
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


from ._version import __version__
from .entropy import KnowledgeEntropy, Measurement, knowledge_entropy
from .errors import ConfigError, LocateError, MissingExtraError, SavedStatsError, ShapeError
from .stats import FIELDS, CoefficientStats

FORMAT = "kacq_hooks.stats"
FORMAT_VERSION = 1
_KEY = "kacq_hooks"  # the safetensors metadata entry that holds the JSON header


@dataclass
class SavedStats(Measurement):
    """Statistics read from a file without a model: enough to merge, compute entropy and tabulate.

    ``sites`` are the header's site records (dicts with path, label, d_ff, kind, experts, expert_d_ff).
    It has the ``stats`` attribute :meth:`kacq_hooks.Instrumentation.merge` reads, so
    ``inst.merge(load_stats(path))`` folds a saved file into a live instrumentation.
    """

    stats: CoefficientStats
    sites: list[dict]
    header: dict

    @property
    def model_type(self) -> str:
        return self.header["model_type"]

    @property
    def labels(self) -> list[str] | None:
        """The layer labels the file's site records hold (None for a file whose records have none)."""
        labels = [site.get("label") for site in self.sites]
        return labels if all(isinstance(label, str) for label in labels) else None

    def merge(self, other) -> "SavedStats":
        _check_same_sites(self.sites, _site_records(other), self.model_type, _model_type_of(other))
        # as Instrumentation.merge: sums measured another way (weighting, padding, count=) are not one measurement
        check_same_measurement(self._settings(), other._settings(), "the other statistics were measured with")
        self.stats.merge(other.stats)
        return self

    def entropy_weighting(self, weighting: str | None) -> str:
        measured = self.header.get("weighting", "token")
        if weighting == "document" and measured != "document":
            raise ConfigError("these statistics were measured with weighting='token', so they hold no document "
                              "sums: measure with instrument(model, weighting='document') to read them by document")
        return weighting or measured

    def knowledge_entropy(self, weighting: str | None = None) -> KnowledgeEntropy:
        return knowledge_entropy(self, weighting)

    def _settings(self) -> dict:
        """How the statistics were measured, as :meth:`kacq_hooks.Instrumentation.merge` compares them."""
        settings = {"sites": [site["path"] for site in self.sites], "weighting": self.header.get("weighting", "token")}
        if "mask_padding" in self.header:
            settings["mask_padding"] = self.header["mask_padding"]
        if self.header.get("count") is not None:
            settings["count"] = self.header["count"]
        return settings


def _model_type(model) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def _model_type_of(source) -> str:
    return source.model_type if isinstance(source, SavedStats) else _model_type(source.model)


def _site_records(source) -> list[dict]:
    """The header's description of the sites of an Instrumentation or a SavedStats."""
    if isinstance(source, SavedStats):
        return source.sites
    return [{"path": s.path, "label": s.label, "d_ff": s.d_ff, "kind": s.kind, "experts": s.experts,
             "expert_d_ff": s.expert_d_ff} for s in source.sites]


def _slices(inst) -> list:
    return [None if shard is None else [shard.offset, shard.width, shard.d_ff] for shard in inst.shards]


def state_of(inst) -> dict:
    """:meth:`kacq_hooks.Instrumentation.state_dict`: the settings, sums and tensor-parallel slices of ``inst``."""
    return {**inst._settings(), "stats": inst.stats.state_dict(), "discarded_calls": inst.discarded_calls,
            "slices": _slices(inst), "reduced": inst.reduced}


def load_state(inst, state: dict) -> None:
    """:meth:`kacq_hooks.Instrumentation.load_state_dict`: ``state`` into ``inst``, refused if measured otherwise."""
    sites = [s.path for s in inst.sites]
    if state.get("sites") != sites:
        raise ShapeError(f"saved statistics are for sites {state.get('sites')}, this instrumentation has {sites}")
    check_same_measurement(inst._settings(), state, "the saved statistics were measured with")
    slices = state.get("slices", [None] * len(inst.sites))
    if state.get("reduced") or any(slices):
        if slices != _slices(inst) and not state.get("reduced"):
            raise ShapeError(f"saved statistics hold tensor-parallel slices {slices}, this rank holds "
                             f"{_slices(inst)}: load each rank's own file")
        if state.get("reduced"):  # whole layers, gathered on the rank that saved them
            inst.stats = CoefficientStats([s.d_ff for s in inst.sites], [layer.device for layer in inst.stats])
    inst.stats.load_state_dict(state["stats"])
    inst.discarded_calls = int(state.get("discarded_calls", 0))
    inst.reduced = bool(state.get("reduced", False))


def settings_of(inst) -> dict:
    """How ``inst`` (an Instrumentation) measures, as saved with its statistics and compared before combining."""
    settings = {"sites": [s.path for s in inst.sites], "weighting": inst.weighting, "mask_padding": inst.mask_padding}
    if inst.count is not None:  # absent when every unpadded token counts, so earlier files still compare
        settings["count"] = inst.count
    return settings


def check_same_measurement(mine: dict, other: dict, what: str) -> None:
    """Refuse to combine statistics measured with other settings (``mine`` and ``other`` as ``_settings()``)."""
    for key in ("sites", "mask_padding"):
        if key in other and key in mine and other[key] != mine[key]:  # an earlier file may not say
            raise ShapeError(f"{what} {key}={other[key]!r}, this instrumentation {key}={mine[key]!r}: their sums "
                             "are not one measurement. Measure both the same way")
    if other.get("count") != mine.get("count"):  # which tokens were counted (instrument(count=...))
        raise ShapeError(f"{what} count={other.get('count')!r}, this instrumentation count={mine.get('count')!r}: "
                         "they counted different tokens. Measure both with the same count=")
    if other.get("weighting", "token") != "document" and mine["weighting"] == "document":
        # token-weighted statistics hold no document sums: the document entropy would miss their documents
        raise ShapeError(f"{what} weighting='token', so they hold no document sums; this instrumentation keeps "
                         "them (weighting='document'). Measure both with weighting='document'")


def header_of(inst) -> dict:
    """The JSON header :func:`save_stats` writes for ``inst`` (an Instrumentation or SavedStats)."""
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "kacq_version": __version__,
        "model_type": _model_type_of(inst), "sites": _site_records(inst),
        **{k: v for k, v in inst._settings().items() if k != "sites"},
        "tokens": [int(s.tokens) for s in inst.stats], "grad_tokens": [int(s.grad_tokens) for s in inst.stats],
        "documents": [int(s.documents) for s in inst.stats],
    }


def save_stats(inst, path: str | Path) -> Path:
    """Write ``inst``'s statistics (an Instrumentation or SavedStats) to ``path`` as safetensors."""
    from safetensors.torch import save_file  # a dependency of transformers, imported only when saving

    tensors = {key: value.detach().to("cpu").contiguous() for key, value in inst.stats.state_dict().items()}
    path = Path(path)
    save_file(tensors, str(path), metadata={_KEY: json.dumps(header_of(inst))})
    return path


def read_header(path: str | Path) -> dict:
    """The JSON header of a saved statistics file, or a SavedStatsError if it is not one."""
    from safetensors import safe_open  # a dependency of transformers, imported only when reading

    path = Path(path)
    if not path.is_file():
        raise SavedStatsError(f"{path} does not exist; save statistics with kacq_hooks.save_stats(inst, path)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for files that are not safetensors
        raise SavedStatsError(f"{path} is not a safetensors file ({err}); kacq_hooks saves statistics with "
                              "kacq_hooks.save_stats") from err
    if _KEY not in metadata:
        raise SavedStatsError(f"{path} is a safetensors file without kacq_hooks statistics (no {_KEY!r} header); "
                              "it may be a model checkpoint rather than saved statistics")
    header = json.loads(metadata[_KEY])
    if header.get("format") != FORMAT or header.get("format_version", 0) > FORMAT_VERSION:
        raise SavedStatsError(f"{path} holds format {header.get('format')!r} version {header.get('format_version')}; "
                              f"this kacq_hooks reads {FORMAT!r} up to version {FORMAT_VERSION}: upgrade kacq_hooks")
    return header


def load_stats(path: str | Path, inst=None):
    """Read saved statistics. With ``inst`` (an Instrumentation of the same model), its statistics are
    replaced by the file's and ``inst`` is returned; without, a :class:`SavedStats` is returned.

    Statistics of a different model (other model type, site paths or widths) raise a SavedStatsError, and
    so does a file that disagrees with itself (tensors that do not fit its sites, header counts that are not
    its tensors'): nothing of it is loaded.
    """
    from safetensors.torch import load_file  # imported only when reading

    header = read_header(path)
    tensors = load_file(str(path))
    saved = SavedStats(CoefficientStats([site["d_ff"] for site in header["sites"]]), header["sites"], header)
    try:
        saved.stats.load_state_dict(tensors)
    except ShapeError as err:
        raise SavedStatsError(f"{path}: its tensors do not fit the sites its header lists ({err}); the file was "
                              "altered or damaged after kacq_hooks.save_stats wrote it") from err
    _check_counts(header, saved.stats, path)
    if inst is None:
        return saved
    _check_same_sites(_site_records(inst), saved.sites, _model_type_of(inst), saved.model_type, path)
    check_same_measurement(inst._settings(), saved._settings(), f"the statistics in {path} were measured with")
    inst.stats.load_state_dict(saved.stats.state_dict())  # copied onto the devices of inst's buffers
    return inst


def _check_counts(header: dict, stats: CoefficientStats, path) -> None:
    """The header's per-layer counts are its tensors' (save_stats writes both from the same buffers)."""
    for field in ("tokens", "grad_tokens", "documents"):
        if field not in header:
            continue
        listed, held = header[field], [int(getattr(layer, field)) for layer in stats]
        if not isinstance(listed, list) or len(listed) != len(held):
            raise SavedStatsError(f"{path}: its header lists {field} {listed!r} for {len(held)} sites; the file was "
                                  "altered or damaged after kacq_hooks.save_stats wrote it")
        for layer, (said, count) in enumerate(zip(listed, held)):
            if said != count:
                raise SavedStatsError(f"{path}: its header says {field} of layer {layer} ({header['sites'][layer]['path']})"
                                      f" is {said} but its tensors hold {count}; the file was altered or damaged after "
                                      "kacq_hooks.save_stats wrote it, so neither can be trusted")


def _check_same_sites(mine: list[dict], theirs: list[dict], my_type: str, their_type: str, path=None) -> None:
    where = f" in {path}" if path is not None else ""
    if my_type != their_type:
        raise SavedStatsError(f"the statistics{where} are of a {their_type!r} model, not {my_type!r}: "
                              "load them with an instrumentation of the model they were measured on")
    shape = lambda sites: [(s["path"], s["d_ff"]) for s in sites]  # noqa: E731
    if shape(mine) != shape(theirs):
        differ = next((f"{a} != {b}" for a, b in zip(shape(mine), shape(theirs)) if a != b),
                      f"{len(mine)} sites != {len(theirs)} sites")
        raise SavedStatsError(f"the statistics{where} were measured at other sites ({differ}): they belong to "
                              "another model or another instrument(..., mlp_out=) choice")


def to_dataframe(inst):
    """One row per (layer label, neuron) with every statistic of ``inst`` (Instrumentation or SavedStats).

    Columns: ``layer`` (the site label), ``path``, ``neuron``, every per-neuron field of
    :class:`kacq_hooks.stats.LayerStats`, the per-layer counts (``tokens``, ``documents``,
    ``grad_tokens``) repeated on each row, and ``mean_abs`` (sum_abs / tokens). Needs pandas.
    """
    try:
        import pandas as pd  # optional: the data extra
    except ImportError as err:
        raise MissingExtraError("pandas", "data", "to_dataframe") from err
    if not len(inst.stats):
        raise LocateError("there are no instrumented sites to tabulate")
    inst.stats.check_finite()  # an overflowed running sum is refused, never tabulated as a number
    frames = []
    for site, layer in zip(_site_records(inst), inst.stats):
        columns = {"layer": site["label"], "path": site["path"], "neuron": range(layer.d_ff)}
        for name in FIELDS:
            value = getattr(layer, name).detach().cpu()
            columns[name] = value.numpy() if value.dim() else int(value)
        columns["mean_abs"] = layer.mean_abs("token").detach().cpu().numpy()
        frames.append(pd.DataFrame(columns))
    return pd.concat(frames, ignore_index=True)


__all__ = ["SavedStats", "save_stats", "load_stats", "read_header", "header_of", "to_dataframe"]
