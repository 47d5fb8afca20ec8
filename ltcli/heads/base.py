"""The classifier-head interface shared by every method, plus input checks and state helpers.

A head maps D-dim features to C class scores (higher = better). It is fitted on the
train FeatureSet, saved as plain tensors and values (see `ltcli.heads.save_head`) and
rebuilt from that state without pickled objects."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterator

import torch

from ..errors import LtcliError
from ..featureset import FeatureSet
from ..options import Opt, or_list
from ..runtime import resolve_device

# float32 elements handled per chunk when scoring, so N x C never needs big temporaries.
_CPU_CHUNK_ELEMS = 1 << 24
_GPU_CHUNK_ELEMS = 1 << 26

Progress = Callable[[int, int], None]  # (epochs done, epochs total)


def source_name(fs: FeatureSet) -> str:
    """How error messages name a feature set: its file when known."""
    path = fs.attrs.get("path") if isinstance(fs.attrs, dict) else None
    return str(path) if path else f"{fs.split} features"


def _check_feature_tensor(feats: Any, source: str) -> None:
    if not isinstance(feats, torch.Tensor) or feats.dim() not in (2, 3):
        shape = tuple(feats.shape) if hasattr(feats, "shape") else type(feats).__name__
        raise LtcliError(f"{source}: features must be N x D or N x K x D, got {shape}")
    if not feats.is_floating_point():
        raise LtcliError(f"{source}: features must be floating point, got {feats.dtype}")


def mean_views(x: torch.Tensor) -> torch.Tensor:
    """N x K x D -> N x D float32 by averaging the stored views (N x D is just cast)."""
    x = x.to(torch.float32)
    return x.mean(dim=1) if x.dim() == 3 else x


def same_shape(held_out: FeatureSet, train: FeatureSet) -> bool:
    """Whether held-out features can stand for the train features' queries: the same D and classes."""
    return held_out.dim == train.dim and list(held_out.class_names) == list(train.class_names)


def _bad_rows(x: torch.Tensor) -> torch.Tensor:
    """Indices of rows of x (rows x ...) holding NaN or inf.

    Screened by row sums (float32, one cheap reduction): any NaN/inf makes its row's sum
    non-finite. Only flagged rows are then checked element-wise, so a finite row whose sum
    merely overflowed is not reported."""
    flat = x.reshape(x.shape[0], -1)
    flagged = (~torch.isfinite(flat.sum(dim=1, dtype=torch.float32))).nonzero().flatten()
    if flagged.numel() == 0:
        return flagged
    return flagged[~torch.isfinite(flat[flagged]).all(dim=1)]


def check_finite(x: torch.Tensor, source: str, what: str = "features") -> None:
    """LtcliError naming the first bad row if x holds NaN or inf (checked in chunks)."""
    n = int(x.shape[0])
    row_elems = max(1, x[0].numel() if n else 1)
    step = max(1, _CPU_CHUNK_ELEMS // row_elems)
    for start in range(0, n, step):
        bad = _bad_rows(x[start : start + step])
        if bad.numel():
            raise LtcliError(f"{source}: {what} contain NaN or inf (first at row {start + int(bad[0])})")


def check_chunk_finite(x: torch.Tensor, start: int, source: str) -> None:
    """check_finite for one chunk already in memory, whose first row is row `start`."""
    bad = _bad_rows(x)
    if bad.numel():
        raise LtcliError(f"{source}: features contain NaN or inf (first at row {start + int(bad[0])})")


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(labels.to(torch.int64), minlength=num_classes)


def missing_classes_message(source: str, missing: list[int], names: list[str], why: str) -> str:
    shown = ", ".join(f"{j} ('{names[j]}')" for j in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    word = "class" if len(missing) == 1 else "classes"
    return f"{source}: {word} {shown}{more} {'has' if len(missing) == 1 else 'have'} no training samples; {why}"


class Head:
    """Base class; a head module defines a subclass, sets the class attributes below,
    implements the hooks and registers it with `@register` (ltcli.heads.registry)."""

    method: ClassVar[str] = ""  # its name: --method, the head file, the table row
    order: ClassVar[int] = 100  # position in tables and in quickstart (the paper's order first)
    summary: ClassVar[str] = ""  # one line for --help
    options_spec: ClassVar[dict[str, Opt]] = {}
    needs_classifier: ClassVar[bool] = False  # uses the stage-1 weight/bias of the features file
    baseline: ClassVar[bool] = False  # the classifier every other head is compared with
    tunable: ClassVar[bool] = False  # its `tau` option is chosen by `tune-tau` on held-out data
    linear_form: ClassVar[bool] = False  # scores = x Wᵀ + b for an effective (W, b): exportable
    shows_weight_norms: ClassVar[bool] = False  # eval --plot draws its per-class ‖w_j‖
    fast_options: ClassVar[dict[str, Any]] = {}  # options that make a fit quick (tests, smoke runs)
    uses_held_out: ClassVar[bool] = False  # fit(held_out=...) is used: fit-head then passes the run's val split

    def __init__(self, **options: Any) -> None:
        # `device` is where this process computes, not part of the head: never saved
        self.device: str | torch.device | None = options.pop("device", None)
        self.options: dict[str, Any] = self.check_options(options)
        self.dim: int | None = None
        self.num_classes: int | None = None
        self.class_names: list[str] = []

    # ---- options -------------------------------------------------------------------------
    @classmethod
    def check_options(cls, options: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
        unknown = sorted(set(options) - set(cls.options_spec))
        if unknown:
            from .registry import HEADS

            flag = "--" + unknown[0].replace("_", "-")
            users = [m for m, h in HEADS.items() if unknown[0] in h.options_spec]
            where = f"only to {or_list(users)}" if users else "no head has it"
            raise LtcliError(f"{flag}: does not apply to --method {cls.method} ({where})")
        merged = dict(base) if base is not None else {k: o.default for k, o in cls.options_spec.items()}
        merged.update(options)
        return {k: cls.options_spec[k].check(k, v) for k, v in merged.items()}

    # ---- fitting -------------------------------------------------------------------------
    def fit(self, train: FeatureSet, *, device: str | torch.device | None = None,
            progress: Progress | None = None, held_out: FeatureSet | None = None, **options: Any) -> "Head":
        """Fit on the train features; `options` override those given at construction.

        device: where training / scoring runs (None = cuda if available, else cpu);
        progress: optional callback(epochs_done, epochs_total) for iterative heads;
        held_out: other samples of the same classes (a val split) for a head that checks itself on
        data it was not fitted on (the recall check of kNN's approximate indexes); others ignore it."""
        if "device" in options:
            self.device = options.pop("device")
        self.options = self.check_options(options, base=self.options)
        dev = resolve_device(device if device is not None else self.device)
        self._check_train(train, values=not self.checks_values_on_device)
        if held_out is not None and not same_shape(held_out, train):
            raise LtcliError(f"{source_name(held_out)}: held-out features must have the train features' D "
                             f"({train.dim}) and classes (it has D={held_out.dim}, {held_out.num_classes} classes)")
        self.dim, self.num_classes, self.class_names = train.dim, train.num_classes, list(train.class_names)
        self._held_out = held_out  # for _fit only: a head keeps no reference to it
        try:
            self._fit(train, dev, progress)
        finally:
            self._held_out = None
        return self

    # heads that check NaN/inf themselves during their own pass over the features
    checks_values_on_device: ClassVar[bool] = False

    def _check_train(self, train: FeatureSet, values: bool = True) -> None:
        src = source_name(train)
        _check_feature_tensor(train.features, src)
        n, c = int(train.features.shape[0]), train.num_classes
        if n == 0:
            raise LtcliError(f"{src}: holds no samples")
        if c == 0:
            raise LtcliError(f"{src}: has no classes")
        labels = train.labels
        if not isinstance(labels, torch.Tensor) or labels.shape != (n,) or labels.is_floating_point():
            raise LtcliError(f"{src}: labels must be N={n} integers")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= c:
            raise LtcliError(f"{src}: label {lo if lo < 0 else hi} out of range for {c} classes")
        counts = train.train_counts
        if not isinstance(counts, torch.Tensor) or counts.shape != (c,):
            raise LtcliError(f"{src}: train_counts must hold one count per class ({c})")
        if values:
            check_finite(train.features, src)
        if self.needs_classifier:
            self._check_classifier(train)

    def _check_classifier(self, train: FeatureSet) -> None:
        """The stage-1 classifier of the features: present, C x D, finite."""
        src, c, d = source_name(train), train.num_classes, train.dim
        if train.weight is None:
            raise LtcliError(f"{src}: has no stage-1 classifier (weight), needed by --method {self.method}")
        if tuple(train.weight.shape) != (c, d):
            raise LtcliError(f"{src}: stage-1 classifier is {tuple(train.weight.shape)}, expected C x D = ({c}, {d})")
        if train.bias is not None and tuple(train.bias.shape) != (c,):
            raise LtcliError(f"{src}: stage-1 bias has shape {tuple(train.bias.shape)}, expected ({c},)")
        check_finite(train.weight, src, "stage-1 classifier weights")
        if train.bias is not None:
            check_finite(train.bias.reshape(c, 1), src, "stage-1 classifier biases")

    def _fit(self, train: FeatureSet, device: torch.device, progress: Progress | None) -> None:
        raise NotImplementedError

    # ---- scoring -------------------------------------------------------------------------
    def _require_fitted(self) -> None:
        if self.dim is None or self.num_classes is None:
            raise LtcliError(f"--method {self.method}: head is not fitted")

    def check_features(self, feats: torch.Tensor, source: str = "features") -> None:
        self._require_fitted()
        _check_feature_tensor(feats, source)
        if int(feats.shape[-1]) != self.dim:
            raise LtcliError(f"{source}: head expects D={self.dim}, features have D={int(feats.shape[-1])}")

    def logits(self, feats: torch.Tensor, *, device: str | torch.device | None = None,
               source: str = "features", progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """N x C float32 CPU scores for N x D features (N x K x D: views averaged), in chunks;
        progress(rows done, rows) after each chunk."""
        out = torch.empty((int(feats.shape[0]), self.num_classes or 0), dtype=torch.float32)
        for start, scores in self.iter_logits(feats, device=device, source=source, progress=progress):
            out[start : start + scores.shape[0]] = scores
        return out

    def iter_logits(self, feats: torch.Tensor, *, device: str | torch.device | None = None,
                    source: str = "features", progress: Callable[[int, int], None] | None = None
                    ) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, rows x C float32 CPU scores) chunk by chunk: what `logits` stacks, for a
        caller that need not hold N x C at once (eval at 8,000 classes: 0.8 GB per head)."""
        self.check_features(feats, source)
        dev = resolve_device(device if device is not None else self.device)
        n = int(feats.shape[0])
        budget = _GPU_CHUNK_ELEMS if dev.type == "cuda" else _CPU_CHUNK_ELEMS
        step = max(1, budget // (feats[0].numel() + self.num_classes)) if n else 1
        for start in range(0, n, step):
            x = mean_views(feats[start : start + step].to(dev, non_blocking=True))
            check_chunk_finite(x, start, source)
            yield start, self._logits_chunk(x, dev).to("cpu", torch.float32)
            if progress is not None:
                progress(start + x.shape[0], n)

    def predict(self, feats: torch.Tensor, *, device: str | torch.device | None = None) -> torch.Tensor:
        """N class indices: the argmax of `logits` (ties to the lower class)."""
        return self.logits(feats, device=device).argmax(dim=1)

    def logits_for(self, fs: FeatureSet, *, device: str | torch.device | None = None) -> torch.Tensor:
        """logits() for a FeatureSet, after checking its classes match the head's."""
        src = source_name(fs)
        self._require_fitted()
        if fs.num_classes != self.num_classes:
            raise LtcliError(f"{src}: head has C={self.num_classes} classes, features have C={fs.num_classes}")
        for j, (a, b) in enumerate(zip(self.class_names, fs.class_names)):
            if a != b:
                raise LtcliError(f"{src}: class {j} is '{b}' but the head's class {j} is '{a}'")
        return self.logits(fs.features, device=device, source=src)

    def _logits_chunk(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Scores for one float32 chunk (rows x D) already on `device`."""
        raise NotImplementedError

    def linear(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The effective (weight C x D, bias C or None) for linear heads, else None."""
        return None

    def scoring_module(self) -> torch.nn.Module | None:
        """A torch module mapping N x D float32 features to these N x C scores (for export), or
        None when the head has no fixed scoring function."""
        return None

    def weight_norms(self) -> torch.Tensor | None:
        """‖w_j‖ of the effective classifier per class (the paper's figure), None if not linear."""
        lin = self.linear()
        return None if lin is None else lin[0].norm(dim=1)

    # ---- persistence ---------------------------------------------------------------------
    def state(self) -> dict:
        """Everything needed to rebuild the head: tensors and plain values only."""
        self._require_fitted()
        return {
            "options": dict(self.options),
            "dim": int(self.dim),
            "num_classes": int(self.num_classes),
            "class_names": list(self.class_names),
            **self._state(),
        }

    def _state(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_state(cls, state: dict) -> "Head":
        """Rebuild a fitted head; LtcliError('head state: ...') if anything is malformed."""
        if not isinstance(state, dict):
            raise LtcliError(f"head state: expected a dict, got {type(state).__name__}")
        options = state.get("options")
        if not isinstance(options, dict):
            raise LtcliError("head state: 'options' missing or not a dict")
        head = cls(**options)
        head.dim = get_int(state, "dim", min_value=1)
        head.num_classes = get_int(state, "num_classes", min_value=1)
        names = state.get("class_names")
        if not (isinstance(names, list) and all(isinstance(s, str) for s in names)):
            raise LtcliError("head state: 'class_names' missing or not a list of strings")
        if len(names) != head.num_classes:
            raise LtcliError(f"head state: {len(names)} class names for {head.num_classes} classes")
        head.class_names = names
        head._load_state(state)
        return head

    def _load_state(self, state: dict) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"


# ---- state readers: every failure is a one-line 'head state: ...' error ------------------
def get_int(state: dict, key: str, min_value: int | None = None) -> int:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise LtcliError(f"head state: '{key}' missing or not an integer")
    if min_value is not None and value < min_value:
        raise LtcliError(f"head state: '{key}' = {value} is below {min_value}")
    return value


def get_tensor(state: dict, key: str, shape: tuple[int, ...], *, floating: bool = True,
               optional: bool = False) -> torch.Tensor | None:
    value = state.get(key)
    if value is None:
        if optional:
            return None
        raise LtcliError(f"head state: '{key}' missing")
    if not isinstance(value, torch.Tensor):
        raise LtcliError(f"head state: '{key}' is a {type(value).__name__}, expected a tensor")
    if tuple(value.shape) != tuple(shape):
        raise LtcliError(f"head state: '{key}' has shape {tuple(value.shape)}, expected {tuple(shape)}")
    if floating:
        if not value.is_floating_point():
            raise LtcliError(f"head state: '{key}' must be floating point, got {value.dtype}")
        if value.numel() and not bool(torch.isfinite(value).all()):
            raise LtcliError(f"head state: '{key}' contains NaN or inf")
    elif value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise LtcliError(f"head state: '{key}' must be integer, got {value.dtype}")
    return value
