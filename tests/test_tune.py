import io
import math

import pytest
import torch
from rich.console import Console

import ltcli.tune as tune
from ltcli.errors import LtcliError
from ltcli.metrics import compute_metrics
from ltcli.tune import pick_best, tau_sweep, tau_table

TAUS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0]
KEYS = ("overall", "macro", "many", "medium", "few")


def make_data(seed=0, n=400, d=16, c=12, dtype=torch.float64):
    """Long-tailed train counts and a classifier whose norms grow with the count, as after
    instance-balanced training, so τ really changes the predictions."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([int(300 * 0.6**i) + 2 for i in range(c)])
    w = torch.randn(c, d, generator=g, dtype=dtype) * (counts.double().log()[:, None] / 3).to(dtype)
    b = torch.randn(c, generator=g, dtype=dtype) * 0.5
    labels = torch.randint(0, c, (n,), generator=g)
    feats = torch.randn(n, d, generator=g, dtype=dtype) + 0.8 * w[labels] / w[labels].norm(dim=1, keepdim=True)
    return feats, labels, w, b, counts


def brute_force(feats, labels, w, b, counts, tau, method, keep_bias):
    """Build the head explicitly and evaluate it like any other head."""
    if method == "tau-norm":
        w_tau = w / w.norm(dim=1, keepdim=True) ** tau
        logits = feats @ w_tau.T + (b if keep_bias and b is not None else 0)
    else:
        prior = counts.double() / counts.sum()
        logits = feats @ w.T + (b if b is not None else 0) - tau * prior.log().to(w.dtype)
    return compute_metrics(logits, labels, counts)


def assert_rows_match(row, ref):
    for k in KEYS:
        if ref[k] is None:
            assert row[k] is None
        else:
            assert row[k] == pytest.approx(ref[k], abs=1e-12), k


@pytest.mark.parametrize("method", ["tau-norm", "logit-adjust"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_sweep_equals_brute_force(method, with_bias):
    feats, labels, w, b, counts = make_data()
    bias = b if with_bias else None
    rows = tau_sweep(feats, labels, w, bias, counts, TAUS, method=method, keep_bias=with_bias, device="cpu")
    assert [r["tau"] for r in rows] == TAUS
    for row, tau in zip(rows, TAUS):
        assert_rows_match(row, brute_force(feats, labels, w, bias, counts, tau, method, with_bias))
    # τ matters on this data, so the test would catch a sweep that ignored it
    assert len({r["overall"] for r in rows}) > 1


def test_tau_norm_drops_the_bias_unless_kept():
    feats, labels, w, b, counts = make_data(seed=1)
    dropped = tau_sweep(feats, labels, w, b, counts, TAUS, device="cpu")
    for row, tau in zip(dropped, TAUS):
        assert_rows_match(row, brute_force(feats, labels, w, None, counts, tau, "tau-norm", False))


def test_tau_zero_without_bias_is_plain_argmax():
    feats, labels, w, b, counts = make_data(seed=2)
    (row,) = tau_sweep(feats, labels, w, b, counts, [0.0], device="cpu")
    assert_rows_match(row, compute_metrics(feats @ w.T, labels, counts))


def test_logit_adjust_tau_zero_is_joint_with_bias():
    feats, labels, w, b, counts = make_data(seed=3)
    (row,) = tau_sweep(feats, labels, w, b, counts, [0.0], method="logit-adjust", device="cpu")
    assert_rows_match(row, compute_metrics(feats @ w.T + b, labels, counts))


def test_float32_features_and_several_chunks(monkeypatch):
    feats, labels, w, b, counts = make_data(seed=4, n=333, dtype=torch.float32)
    whole = tau_sweep(feats.half(), labels, w, b, counts, TAUS, keep_bias=True, device="cpu")
    monkeypatch.setattr(tune, "_MATMUL_ROWS", 50)  # 7 chunks, the last one short
    chunked = tau_sweep(feats.half(), labels, w, b, counts, TAUS, keep_bias=True, device="cpu")
    assert chunked == whole
    # float16 features are computed in float32 and agree with an explicit float32 head
    for row, tau in zip(whole, TAUS):
        ref = brute_force(feats.half().float(), labels, w, b, counts, tau, "tau-norm", True)
        assert row["overall"] == pytest.approx(ref["overall"], abs=2 / 333)


@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_cpu_and_batched_paths_agree_with_argmax_on_ties(seed, additive, with_bias):
    # Small integer scores and scales make exact ties common: the amax shortcut must break
    # them like torch.argmax (lowest class wins).
    g = torch.Generator().manual_seed(seed)
    d = torch.randint(-3, 4, (300, 7), generator=g).double()
    y = torch.randint(0, 7, (300,), generator=g)
    cols = torch.randint(0, 3, (5, 7), generator=g).double() + (0 if additive else 1)
    b = torch.randint(-1, 2, (7,), generator=g).double() if with_bias and not additive else None
    z = tune._scores(d[None], cols[:, None, :], b, additive)
    expected = z.argmax(dim=2) == y[None, :]
    assert torch.equal(tune._grid_correct_cpu(d, y, cols, b, additive, block_elems=64), expected)
    assert torch.equal(tune._grid_correct_batched(d, y, cols, b, additive, block_elems=5000), expected)


def test_all_equal_scores_predict_class_zero():
    feats = torch.zeros(4, 3)
    w = torch.ones(3, 3)
    (row,) = tau_sweep(feats, torch.tensor([0, 1, 2, 0]), w, None, [500, 50, 5], [1.0], device="cpu")
    assert row["overall"] == 0.5 and row["many"] == 1.0 and row["medium"] == 0.0 and row["few"] == 0.0


def test_zero_norm_weight_row_scores_zero():
    feats = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # class 1 has a zero weight vector
    rows = tau_sweep(feats, torch.tensor([0, 1]), w, None, [500, 5], [0.0, 2.0], device="cpu")
    assert all(r["overall"] == 1.0 for r in rows)  # -1 < 0 = class 1's score, at every τ


def test_single_view_features_are_accepted():
    feats, labels, w, b, counts = make_data(seed=5)
    flat = tau_sweep(feats, labels, w, None, counts, TAUS, device="cpu")
    assert tau_sweep(feats[:, None, :], labels, w, None, counts, TAUS, device="cpu") == flat


def test_group_without_eval_classes_is_none():
    feats, labels, w, b, counts = make_data(seed=6)
    keep = counts[labels] > 100  # evaluate on many-shot classes only
    rows = tau_sweep(feats[keep], labels[keep], w, None, counts, TAUS, device="cpu")
    assert all(r["few"] is None and r["medium"] is None for r in rows)
    with pytest.raises(LtcliError, match="--metric few"):
        pick_best(rows, "few")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"method": "ncm"}, "--method"),
        ({"taus": []}, "--grid"),
        ({"taus": [float("nan")]}, "--grid"),
        ({"taus": [1e6]}, "--grid: τ = 1e\\+06 overflows"),
        ({"weight": torch.ones(12, 5)}, "classifier weight"),
        ({"bias": torch.ones(3)}, "classifier bias"),
        ({"train_counts": [1, 2]}, "train counts"),
        ({"labels": torch.zeros(3, dtype=torch.long)}, "labels"),
        ({"labels": torch.full((400,), 12)}, "labels"),
        ({"features": torch.zeros(400, 2, 16)}, "features"),
        ({"many": 10, "few": 50}, "few"),
    ],
)
def test_bad_inputs(kwargs, fragment):
    feats, labels, w, b, counts = make_data()
    args = dict(features=feats, labels=labels, weight=w, bias=b, train_counts=counts, taus=TAUS, device="cpu")
    args.update(kwargs)
    with pytest.raises(LtcliError, match=fragment):
        tau_sweep(**args)


def test_nan_features_and_empty_classes_refused():
    feats, labels, w, b, counts = make_data()
    feats[7, 3] = float("nan")
    with pytest.raises(LtcliError, match="features: NaN or inf"):
        tau_sweep(feats, labels, w, b, counts, TAUS, device="cpu")
    feats, labels, w, b, counts = make_data()
    counts[4] = 0
    with pytest.raises(LtcliError, match="class 4 has no training samples"):
        tau_sweep(feats, labels, w, b, counts, TAUS, method="logit-adjust", device="cpu")


def test_pick_best_and_tie_breaks():
    rows = [
        {"tau": 0.0, "overall": 0.50, "macro": 0.40, "many": 0.9, "medium": 0.4, "few": 0.1},
        {"tau": 0.5, "overall": 0.60, "macro": 0.55, "many": 0.8, "medium": 0.5, "few": 0.3},
        {"tau": 1.0, "overall": 0.58, "macro": 0.55, "many": 0.7, "medium": 0.5, "few": 0.4},
        {"tau": 1.5, "overall": 0.60, "macro": 0.52, "many": 0.6, "medium": 0.5, "few": 0.4},
    ]
    assert pick_best(rows)["tau"] == 0.5  # tie on overall: the smaller τ
    assert pick_best(rows, "macro")["tau"] == 0.5  # tie on macro: the higher overall
    assert pick_best(rows, "few")["tau"] == 1.5  # tie on few: the higher overall
    with pytest.raises(LtcliError, match="--metric"):
        pick_best(rows, "top5")


def test_tau_table_marks_best_row():
    rows = tau_sweep(*make_data()[:3], None, make_data()[4], TAUS, device="cpu")
    best = pick_best(rows)
    console = Console(file=io.StringIO(), width=120, record=True)
    console.print(tau_table(rows, best["tau"], title="τ-norm on val"))
    text = console.export_text()
    assert text.count("◀") == 1
    marked = next(line for line in text.splitlines() if "◀" in line)
    assert f"{best['tau']:g} ◀" in marked and f"{100 * best['overall']:.1f}" in marked


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("method", ["tau-norm", "logit-adjust"])
def test_cuda_matches_cpu(method):
    feats, labels, w, b, counts = make_data(seed=7, n=3000, dtype=torch.float32)
    cpu = tau_sweep(feats, labels, w, b, counts, TAUS, method=method, keep_bias=True, device="cpu")
    gpu = tau_sweep(feats, labels, w, b, counts, TAUS, method=method, keep_bias=True, device="cuda")
    for a, c in zip(cpu, gpu):
        assert math.isclose(a["overall"], c["overall"], abs_tol=2 / 3000)


@pytest.mark.parametrize("method, opts", [("tau-norm", {}), ("tau-norm", {"keep_bias": True}), ("logit-adjust", {})])
def test_sweep_agrees_with_the_fitted_heads(method, opts):
    """The sweep must report what `eval` will measure for the head saved with the picked τ."""
    heads = pytest.importorskip("ltcli.heads")
    from ltcli.featureset import FeatureSet

    feats, labels, w, b, counts = make_data(seed=8, n=600, dtype=torch.float32)
    fs = FeatureSet(feats, labels, w, b, [f"c{j}" for j in range(len(counts))], counts, "val")
    rows = tau_sweep(feats, labels, w, b, counts, TAUS, method=method, device="cpu", **opts)
    for row, tau in zip(rows, TAUS):
        head = heads.build_head(method, tau=tau, **opts).fit(fs, device="cpu")
        ref = compute_metrics(head.logits(feats, device="cpu"), labels, counts)
        # float32 rounding may at most flip a near-tie: one sample overall, ~1/50 of a class
        assert row["overall"] == pytest.approx(ref["overall"], abs=1 / 600), tau
        for k in KEYS[1:]:
            assert row[k] == pytest.approx(ref[k], abs=0.03), (tau, k)


def test_grid_edge_note_only_when_the_best_is_at_the_largest_tau():
    from ltcli.tune import grid_edge_note

    def rows(values):
        return [{"tau": 0.5 * i, "overall": v} for i, v in enumerate(values)]

    note = grid_edge_note(rows([0.60, 0.70, 0.80]))           # still rising at τ = 1
    assert "largest τ of the grid (1)" in note and "--grid 0:2:0.5" in note
    assert grid_edge_note(rows([0.60, 0.80, 0.80])) is not None  # tied at the edge
    assert grid_edge_note(rows([0.60, 0.80, 0.70])) is None      # a peak inside the grid
    assert grid_edge_note(rows([0.60])) is None
