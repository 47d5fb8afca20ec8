import numpy as np
import pytest
import torch

from ltcli.errors import LtcliError
from ltcli.metrics import compute_metrics
from ltcli.plots import plot_per_class_accuracy, plot_tau_curve, plot_weight_norms

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COUNTS = [500, 300, 150, 90, 60, 40, 25, 15, 9, 5]


def assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 1024
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []


def sweep_rows(with_few=True):
    taus = np.linspace(0, 2, 41)
    return [
        {
            "tau": float(t), "overall": 0.6 + 0.1 * np.sin(t), "macro": 0.55 + 0.1 * np.sin(t),
            "many": 0.8 - 0.1 * t, "medium": 0.5 + 0.05 * t, "few": (0.2 + 0.2 * t) if with_few else None,
        }
        for t in taus
    ]


def head_metrics(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(20)
    scores = torch.randn(200, 10, generator=g) + 2.0 * torch.nn.functional.one_hot(labels, 10)
    return compute_metrics(scores, labels, COUNTS)


def test_tau_curve(tmp_path):
    path = tmp_path / "reports" / "tau.png"
    plot_tau_curve(sweep_rows(), 0.9, path, title="τ-norm on val")
    assert_png(path)


def test_tau_curve_with_missing_group_and_no_best(tmp_path):
    path = tmp_path / "tau.png"
    plot_tau_curve(sweep_rows(with_few=False), None, path)
    assert_png(path)


def test_tau_curve_refuses_empty(tmp_path):
    with pytest.raises(LtcliError):
        plot_tau_curve([], None, tmp_path / "tau.png")


def test_per_class_accuracy(tmp_path):
    path = tmp_path / "per-class.png"
    plot_per_class_accuracy({"joint": head_metrics(0), "crt": head_metrics(1)}, torch.tensor(COUNTS), path)
    assert_png(path)


def test_per_class_accuracy_skips_zero_counts_and_absent_classes(tmp_path):
    counts = [0] + COUNTS[1:]
    labels = torch.arange(1, 10)  # class 0 absent from eval
    m = compute_metrics(labels, labels, counts)
    path = tmp_path / "per-class.png"
    plot_per_class_accuracy({"joint": m}, counts, path)
    assert_png(path)


def test_per_class_accuracy_refuses_mismatch(tmp_path):
    with pytest.raises(LtcliError, match="joint"):
        plot_per_class_accuracy({"joint": head_metrics(0)}, COUNTS[:5], tmp_path / "x.png")


def test_weight_norms(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(10, 8, generator=g) * torch.tensor(COUNTS).float().log()[:, None]
    norms = {"joint": w.norm(dim=1), "tau-norm": (w / w.norm(dim=1, keepdim=True) ** 0.7).norm(dim=1).numpy()}
    path = tmp_path / "norms.png"
    plot_weight_norms(norms, np.array(COUNTS)[::-1].copy(), path)
    assert_png(path)


def test_weight_norms_refuses_mismatch(tmp_path):
    with pytest.raises(LtcliError, match="crt"):
        plot_weight_norms({"crt": np.ones(3)}, COUNTS, tmp_path / "x.png")


def test_overwrite_replaces_file(tmp_path):
    path = tmp_path / "tau.png"
    path.write_bytes(b"old")
    plot_tau_curve(sweep_rows(), 1.0, path)
    assert_png(path)


def test_importing_plots_leaves_pyplot_backend_alone():
    import matplotlib

    before = matplotlib.get_backend()
    import ltcli.plots  # noqa: F401

    assert matplotlib.get_backend() == before


def test_many_classes(tmp_path):
    # ImageNet-LT-like: binned means for the per-class plot, a step outline for the counts
    c = 300
    counts = np.maximum((1280 * 0.98 ** np.arange(c)).astype(int), 5)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(c).repeat_interleave(3)
    scores = torch.randn(len(labels), c, generator=g)
    m = compute_metrics(scores, labels, counts)
    plot_per_class_accuracy({"joint": m, "crt": m}, counts, tmp_path / "pc.png")
    assert_png(tmp_path / "pc.png")
    plot_weight_norms({"joint": np.log(counts + 1.0)}, counts, tmp_path / "norms.png")
    assert_png(tmp_path / "norms.png")
