"""ltcli: long-tailed recognition by decoupling representation and classifier.

The Python API (stable; the command line is a thin client of the same code):

    import ltcli
    train = ltcli.read_features("run/features/train.h5")          # or ltcli.feature_set(x, y, ...)
    test = ltcli.read_features("run/features/test.h5")
    head = ltcli.build_head("crt", epochs=20).fit(train)            # any of ltcli.methods()
    scores = head.logits(test.features)                             # N x C, higher = better
    labels = head.predict(test.features)                            # N class indices
    m = ltcli.compute_metrics(scores, test.labels, test.train_counts)   # overall, many, medium, few ...
    rows = ltcli.tau_sweep(val.features, val.labels, val.weight, val.bias, val.train_counts,
                           [0, 0.5, 1, 1.5], method="tau-norm")
    ltcli.save_head(head, "crt.pt", {"note": "mine"});  head, prov = ltcli.load_head("crt.pt")

See the README's "Python API" section.
"""

__version__ = "0.2.0"

_API = {
    "FeatureSet": "ltcli.featureset",
    "feature_set": "ltcli.featureset",
    "read_features": "ltcli.cache",
    "build_head": "ltcli.heads",
    "load_head": "ltcli.heads",
    "save_head": "ltcli.heads",
    "methods": "ltcli.heads",
    "compute_metrics": "ltcli.metrics",
    "tau_sweep": "ltcli.tune",
    "LtcliError": "ltcli.errors",
    "JobFailed": "ltcli.errors",
}
__all__ = ["__version__", *_API]


def __getattr__(name):  # imported on first use: `import ltcli` stays light
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'ltcli' has no attribute {name!r}")
