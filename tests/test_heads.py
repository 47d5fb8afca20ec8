"""Classifier heads against brute-force references on small random data."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ltcli import faiss_index, neighbours
from ltcli.errors import LtcliError
from ltcli.featureset import FeatureSet
from ltcli.heads import HEADS, available_methods, build_head
from ltcli.heads import base as heads_base


def make_fs(x, y, w=None, b=None, counts=None, split="train", names=None):
    c = w.shape[0] if w is not None else int(y.max()) + 1
    names = names or [f"class{i}" for i in range(c)]
    counts = counts if counts is not None else torch.bincount(y, minlength=c)
    return FeatureSet(x, y, w, b, names, counts, split, {})


def random_fs(n=200, c=6, d=12, seed=0, bias=True, views=1):
    g = torch.Generator().manual_seed(seed)
    shape = (n, views, d) if views > 1 else (n, d)
    x = torch.randn(shape, generator=g)
    y = torch.arange(n) % c  # every class present
    w = torch.randn(c, d, generator=g)
    b = torch.randn(c, generator=g) if bias else None
    return make_fs(x, y, w, b)


def longtail_problem(seed=0, c=20, d=32, nmax=400, imbalance=100, test_per=50, views=1):
    """Gaussian classes with a stage-1 classifier biased like a long-tailed joint model:
    head classes get larger weight norms and larger biases."""
    g = torch.Generator().manual_seed(seed)
    counts = [int(nmax * imbalance ** (-i / (c - 1))) for i in range(c)]
    mu = torch.randn(c, d, generator=g)

    def draw(cnts, k):
        y = torch.cat([torch.full((n,), j) for j, n in enumerate(cnts)])
        x = mu[y].unsqueeze(1) + torch.randn(len(y), k, d, generator=g)
        return (x if k > 1 else x[:, 0]), y

    n = torch.tensor(counts, dtype=torch.float32)
    w = mu * (n / n.max()).sqrt().unsqueeze(1) * 1.5
    b = (n / n.max()).log()
    xtr, ytr = draw(counts, views)
    xte, yte = draw([test_per] * c, 1)
    tc = torch.tensor(counts)
    return make_fs(xtr, ytr, w, b, tc), make_fs(xte, yte, w, b, tc, split="test")


def per_class_acc(scores, y, c):
    pred = scores.argmax(1)
    return torch.stack([(pred[y == j] == j).float().mean() for j in range(c)])


# ---- linear heads: equivalences ----------------------------------------------------------
def test_tau_zero_without_bias_equals_joint_without_bias():
    fs = random_fs(bias=True)
    joint_nb = build_head("joint").fit(make_fs(fs.features, fs.labels, fs.weight, None))
    tau0 = build_head("tau-norm", tau=0.0).fit(fs)  # bias dropped by default
    assert torch.allclose(tau0.logits(fs.features), joint_nb.logits(fs.features), atol=1e-6)


def test_tau_norm_keep_bias_and_formula():
    fs = random_fs()
    h = build_head("tau-norm", tau=0.5, keep_bias=True).fit(fs)
    w = fs.weight / fs.weight.norm(dim=1, keepdim=True) ** 0.5
    ref = fs.features @ w.T + fs.bias
    assert torch.allclose(h.logits(fs.features), ref, atol=1e-5)


def test_tau_one_rows_have_unit_norm():
    fs = random_fs()
    w, b = build_head("tau-norm", tau=1.0).fit(fs).linear()
    assert b is None
    assert torch.allclose(w.norm(dim=1), torch.ones(w.shape[0]), atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(tau=st.floats(0.0, 3.0), seed=st.integers(0, 1000))
def test_tau_norm_property(tau, seed):
    fs = random_fs(n=20, c=4, d=5, seed=seed)
    w, _ = build_head("tau-norm", tau=tau).fit(fs).linear()
    norms = fs.weight.norm(dim=1)
    assert torch.allclose(w.norm(dim=1), norms ** (1 - tau), rtol=1e-4)


def test_lws_with_unit_scales_equals_joint():
    fs = random_fs()
    joint = build_head("joint").fit(fs)
    lws = build_head("lws", epochs=1).fit(fs, device="cpu")
    lws.scales = torch.ones(fs.num_classes)  # unit scales: the joint classifier itself
    lws._reset_cache()
    assert torch.allclose(lws.logits(fs.features), joint.logits(fs.features), atol=1e-5)


def test_lws_scales_whole_logit_bias_included():
    fs = random_fs()
    lws = build_head("lws", epochs=2).fit(fs, device="cpu")
    z = fs.features @ fs.weight.T + fs.bias
    assert torch.allclose(lws.logits(fs.features), z * lws.scales, atol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_logit_adjust_tau_zero_equals_joint(bias):
    fs = random_fs(bias=bias)
    joint = build_head("joint").fit(fs)
    la = build_head("logit-adjust", tau=0.0).fit(fs)
    assert torch.allclose(la.logits(fs.features), joint.logits(fs.features), atol=1e-6)


def test_logit_adjust_formula():
    fs = random_fs()
    fs.train_counts = torch.tensor([50, 20, 10, 5, 2, 1])
    la = build_head("logit-adjust", tau=1.5).fit(fs)
    prior = fs.train_counts.double() / fs.train_counts.sum()
    ref = fs.features @ fs.weight.T + fs.bias - 1.5 * prior.log().float()
    assert torch.allclose(la.logits(fs.features), ref, atol=1e-5)


def test_logit_adjust_zero_count_class_is_named():
    fs = random_fs()
    fs.train_counts = torch.tensor([5, 0, 3, 3, 3, 3])
    with pytest.raises(LtcliError, match=r"class 1 \('class1'\)"):
        build_head("logit-adjust").fit(fs)


def test_views_are_averaged_for_scoring():
    fs = random_fs(views=3)
    # queries apart from the train points: a self-match has distance ~0, where kNN's
    # 1/(1+d) vote is ill-conditioned (sqrt of a rounding error)
    q = torch.randn(40, 3, fs.dim, generator=torch.Generator().manual_seed(9))
    for method in ("joint", "ncm", "knn"):
        h = build_head(method).fit(fs)
        assert torch.allclose(h.logits(q), h.logits(q.mean(1)), atol=1e-5), method


def test_chunked_scoring_matches_one_chunk(monkeypatch):
    fs = random_fs(n=300)
    q = torch.randn(100, fs.dim, generator=torch.Generator().manual_seed(9))
    heads = [build_head(m, **HEADS[m].fast_options).fit(fs, device="cpu") for m in available_methods()]
    whole = [h.logits(q, device="cpu") for h in heads]
    monkeypatch.setattr(heads_base, "_CPU_CHUNK_ELEMS", 7 * (fs.dim + fs.num_classes))  # 7 rows
    for h, ref in zip(heads, whole):
        assert torch.allclose(h.logits(q, device="cpu"), ref, atol=1e-5), h.method


def test_streamed_scores_give_the_metrics_of_the_whole_matrix(monkeypatch):
    """eval never holds N x C scores: the label ranks it gathers chunk by chunk (iter_logits,
    several chunks here, kNN's vote rows included) give every metric of the whole matrix."""
    from ltcli.heads import knn as knn_module
    from ltcli.metrics import compute_metrics, label_ranks

    fs = random_fs(n=300)
    q = torch.randn(100, fs.dim, generator=torch.Generator().manual_seed(9))
    y = torch.randint(0, fs.num_classes, (100,), generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(heads_base, "_CPU_CHUNK_ELEMS", 7 * (fs.dim + fs.num_classes))  # 7 rows
    monkeypatch.setattr(knn_module, "VOTE_ROWS", 9)
    for m in available_methods():
        h = build_head(m, **HEADS[m].fast_options).fit(fs, device="cpu")
        ranks, starts = torch.full((100,), -1), []
        for start, scores in h.iter_logits(q, device="cpu"):
            starts.append(start)
            ranks[start : start + len(scores)] = label_ranks(scores, y[start : start + len(scores)])
        assert len(starts) > 1 and (ranks >= 0).all(), m
        whole = compute_metrics(h.logits(q, device="cpu"), y, fs.train_counts)
        assert compute_metrics(None, y, fs.train_counts, ranks=ranks) == whole, m


# ---- NCM and kNN against NumPy -----------------------------------------------------------
def _np_normalise(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def ncm_reference(xtr, ytr, xq, c, metric):
    mean = xtr.mean(0)
    ftr, fq = _np_normalise(xtr - mean), _np_normalise(xq - mean)
    means = np.stack([ftr[ytr == j].mean(0) for j in range(c)])
    if metric == "cosine":
        return fq @ _np_normalise(means).T
    return -((fq[:, None, :] - means[None]) ** 2).sum(-1)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_ncm_equals_numpy_nearest_mean(metric):
    tr = random_fs(n=240, c=8, d=10, seed=1)
    q = torch.randn(100, 10, generator=torch.Generator().manual_seed(2))
    h = build_head("ncm", metric=metric).fit(tr)
    ref = ncm_reference(tr.features.double().numpy(), tr.labels.numpy(), q.double().numpy(), 8, metric)
    got = h.logits(q)
    assert np.allclose(got.numpy(), ref, atol=1e-4)
    assert np.array_equal(got.argmax(1).numpy(), ref.argmax(1))


def knn_reference(xtr, ytr, xq, c, k, metric, weighting):
    if metric == "cosine":
        mean = xtr.mean(0)
        xtr, xq = _np_normalise(xtr - mean), _np_normalise(xq - mean)
    d2 = ((xq[:, None, :] - xtr[None]) ** 2).sum(-1)
    out = np.zeros((len(xq), c))
    for i in range(len(xq)):
        for j in np.argsort(d2[i], kind="stable")[:k]:
            out[i, ytr[j]] += 1.0 if weighting == "count" else 1.0 / (1.0 + np.sqrt(d2[i, j]))
    return out


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("k,weighting", [(1, "distance"), (7, "distance"), (7, "count")])
def test_knn_equals_numpy_neighbour_search(metric, k, weighting):
    tr = random_fs(n=150, c=5, d=8, seed=3)
    q = torch.randn(60, 8, generator=torch.Generator().manual_seed(4))
    h = build_head("knn", k=k, metric=metric, weighting=weighting).fit(tr)
    ref = knn_reference(tr.features.double().numpy(), tr.labels.numpy(), q.double().numpy(), 5, k,
                        metric, weighting)
    got = np.maximum(h.logits(q).numpy(), 0)  # classes without a vote score below 0 (by similarity)
    assert np.allclose(got, ref, atol=1e-4)
    if k == 1:  # nearest neighbour's label
        d2 = ((q[:, None] - tr.features[None]) ** 2).sum(-1) if metric == "euclidean" else None
        if d2 is not None:
            assert np.array_equal(got.argmax(1), tr.labels[d2.argmin(1)].numpy())


def test_knn_k_larger_than_train_set():
    tr = random_fs(n=12, c=3, d=4)
    h = build_head("knn", k=50, weighting="count").fit(tr)
    assert torch.allclose(h.logits(tr.features).sum(1), torch.full((12,), 12.0))


def test_ncm_zero_sample_class_is_named():
    tr = random_fs(n=60, c=6)
    tr.labels = torch.where(tr.labels == 4, 0, tr.labels)
    with pytest.raises(LtcliError, match=r"class 4 \('class4'\) has no training samples"):
        build_head("ncm").fit(tr)


def test_faiss_search_chunks_and_backend():
    g = torch.Generator().manual_seed(0)
    base, q = torch.randn(50, 6, generator=g), torch.randn(23, 6, generator=g).half()
    index = faiss_index.make_index(6, "euclidean")
    faiss_index.add(index, base, chunk_rows=7)
    d1, i1 = faiss_index.search(index, q, 5)
    d2, i2 = faiss_index.search(index, q, 5, chunk_rows=4)
    assert np.array_equal(i1, i2) and np.allclose(d1, d2)
    ref = ((q.float()[:, None] - base[None]) ** 2).sum(-1)
    assert np.array_equal(i1[:, 0], ref.argmin(1).numpy())
    assert faiss_index.backend_name().startswith("faiss ")
    with pytest.raises(LtcliError, match="--metric"):
        faiss_index.make_index(6, "manhattan")


@pytest.mark.parametrize("flags, core", [
    ({"sse3", "avx", "avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}, "SKYLAKEX"),
    ({"sse3", "avx", "avx2", "fma", "avx512f"}, "HASWELL"),  # AVX-512 without BW / VL: not SkylakeX's kernels
    ({"sse3", "avx", "avx2", "fma"}, "HASWELL"),
    ({"sse3", "avx", "avx2"}, None),
    (set(), None),  # no /proc/cpuinfo, or not x86 (aarch64 lists asimd ...)
])
def test_openblas_core_is_what_the_cpu_can_run(flags, core):
    assert faiss_index.openblas_core(frozenset(flags)) == core


FAISS_OPENBLAS_KERNELS = """
import os
from ltcli import faiss_index
kernels = faiss_index.openblas_kernels()
assert os.environ.get("OPENBLAS_CORETYPE") == os.environ.get("CHOSEN")  # set for faiss's load only
print(kernels or "none")
print(faiss_index.backend_name())
"""


def test_faiss_bundled_openblas_runs_the_kernels_this_cpu_can_run():
    """faiss-cpu's own OpenBLAS, loaded through ltcli, uses this CPU's vector kernels (its own
    detection falls back to generic SSE3 ones on CPUs newer than it); reports name them."""
    import os
    import subprocess
    import sys

    from ltcli.runtime import cpu_flags

    def kernels(**env) -> list[str]:
        base = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "CHOSEN")}
        return subprocess.run([sys.executable, "-c", FAISS_OPENBLAS_KERNELS], env={**base, **env},
                              capture_output=True, text=True, check=True).stdout.split("\n")

    expected = faiss_index.openblas_core(cpu_flags())
    core, backend = kernels()[:2]
    if core == "none" or expected is None:
        pytest.skip("no OpenBLAS bundled with faiss here, or a CPU whose kernels OpenBLAS picks itself")
    assert core.upper() == expected and backend.endswith(f", OpenBLAS {core}")
    # a user's own choice is left alone
    core, _ = kernels(OPENBLAS_CORETYPE="Prescott", CHOSEN="Prescott")[:2]
    assert core.upper() == "PRESCOTT"


# ---- trained heads -----------------------------------------------------------------------
def test_crt_well_separated_clusters():
    g = torch.Generator().manual_seed(0)
    c, d = 10, 16
    mu = torch.randn(c, d, generator=g) * 4
    counts = [300, 200, 120, 80, 50, 30, 20, 12, 8, 5]
    y = torch.cat([torch.full((n,), j) for j, n in enumerate(counts)])
    x = mu[y] + torch.randn(len(y), d, generator=g)
    yt = torch.arange(c).repeat_interleave(100)
    xt = mu[yt] + torch.randn(len(yt), d, generator=g)
    h = build_head("crt").fit(make_fs(x, y), device="cpu")
    assert (h.logits(xt).argmax(1) == yt).float().mean() >= 0.99


def test_rebalancing_heads_raise_few_shot_accuracy():
    tr, te = longtail_problem()
    few = tr.train_counts < 20
    acc = {}
    for method in ("joint", "crt", "lws", "tau-norm", "logit-adjust"):
        h = build_head(method).fit(tr, device="cpu")
        acc[method] = per_class_acc(h.logits_for(te), te.labels, te.num_classes)[few].mean().item()
    for method in ("crt", "lws", "tau-norm", "logit-adjust"):
        assert acc[method] > acc["joint"] + 0.1, acc


def test_crt_uses_views_and_is_deterministic():
    tr, te = longtail_problem(views=3, c=8, nmax=100)
    a = build_head("crt", epochs=3, seed=5).fit(tr, device="cpu")
    b = build_head("crt", epochs=3, seed=5).fit(tr, device="cpu")
    other = build_head("crt", epochs=3, seed=6).fit(tr, device="cpu")
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, other.weight)
    assert per_class_acc(a.logits_for(te), te.labels, 8).mean() > 0.8


def test_balanced_stream_is_class_balanced():
    from ltcli.heads._balanced import BalancedStream

    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    s = BalancedStream(labels, num_classes=4, views=2, rng=np.random.default_rng(0))
    ids, cls = s.epoch()
    assert len(ids) == 1000
    sample, view = ids // 2, ids % 2
    assert torch.equal(labels[sample], cls)
    share = torch.bincount(cls, minlength=4).float() / 1000
    assert share[3] == 0 and (share[:3] - 1 / 3).abs().max() < 0.06  # empty class 3 never drawn
    assert 0.4 < view.float().mean() < 0.6
    assert len(torch.unique(sample[cls == 2])) == 10  # every tail image gets used


def test_progress_callback():
    seen = []
    build_head("crt", epochs=3).fit(random_fs(), device="cpu", progress=lambda e, t: seen.append((e, t)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


# ---- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", available_methods())
def test_mismatches_and_non_finite(method):
    fs = random_fs()
    opts = HEADS[method].fast_options
    h = build_head(method, **opts).fit(fs, device="cpu")
    with pytest.raises(LtcliError, match=r"head expects D=12, features have D=7"):
        h.logits(torch.randn(5, 7))
    other = make_fs(torch.randn(5, 12), torch.arange(5) % 3, names=["a", "b", "c"])
    with pytest.raises(LtcliError, match=r"head has C=6 classes, features have C=3"):
        h.logits_for(other)
    renamed = make_fs(fs.features, fs.labels, fs.weight, fs.bias, names=[f"x{i}" for i in range(6)])
    with pytest.raises(LtcliError, match=r"class 0 is 'x0'"):
        h.logits_for(renamed)
    bad = fs.features.clone()
    bad[17, 3] = float("nan")
    with pytest.raises(LtcliError, match=r"NaN or inf \(first at row 17\)"):
        h.logits(bad)
    bad[17, 3] = float("inf")
    with pytest.raises(LtcliError, match="NaN or inf"):
        build_head(method, **opts).fit(make_fs(bad, fs.labels, fs.weight, fs.bias), device="cpu")


def test_fit_input_errors():
    fs = random_fs()
    with pytest.raises(LtcliError, match="has no stage-1 classifier"):
        build_head("tau-norm").fit(make_fs(fs.features, fs.labels, None, None, names=fs.class_names))
    with pytest.raises(LtcliError, match=r"stage-1 classifier is \(6, 5\)"):
        build_head("joint").fit(make_fs(fs.features, fs.labels, torch.randn(6, 5)))
    with pytest.raises(LtcliError, match="out of range"):
        build_head("crt").fit(make_fs(fs.features, fs.labels + 3, fs.weight, fs.bias))
    fs.attrs = {"path": "/runs/x/features/train.h5"}
    fs.features[0, 0] = float("nan")
    with pytest.raises(LtcliError, match=r"^/runs/x/features/train.h5: features contain NaN"):
        build_head("ncm").fit(fs)


def test_option_errors():
    with pytest.raises(LtcliError, match=r"--method foo: unknown head"):
        build_head("foo")
    with pytest.raises(LtcliError, match=r"--tua: does not apply to --method tau-norm"):
        build_head("tau-norm", tua=1.0)
    with pytest.raises(LtcliError, match=r"--tau -1.0: must be a finite number >= 0"):
        build_head("tau-norm", tau=-1)
    with pytest.raises(LtcliError, match=r"--k: expected an integer"):
        build_head("knn", k=2.5)
    with pytest.raises(LtcliError, match=r"--metric cityblock: choose cosine or euclidean"):
        build_head("ncm", metric="cityblock")
    with pytest.raises(LtcliError, match=r"--keep-bias: expected true or false"):
        build_head("tau-norm", keep_bias="yes")
    assert build_head("tau_norm").method == "tau-norm"
    h = build_head("crt", batch_size=256)
    assert h.options["lr"] is None and h.options["epochs"] == 10
    with pytest.raises(LtcliError, match="not fitted"):
        h.logits(torch.randn(2, 3))


def test_device_option_and_weight_norms():
    fs = random_fs()
    h = build_head("tau-norm", tau=1.0, device="cpu")
    assert "device" not in h.options  # runtime setting, never saved
    h.fit(fs)
    assert torch.allclose(h.weight_norms(), torch.ones(fs.num_classes), atol=1e-6)
    assert build_head("ncm").fit(fs).weight_norms() is None
    assert torch.allclose(build_head("joint").fit(fs).weight_norms(), fs.weight.norm(dim=1))
    with pytest.raises(LtcliError, match="--device tpu"):
        build_head("joint", device="tpu").fit(fs)


def test_faiss_pairwise_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    base, q = torch.randn(9, 5, generator=g), torch.randn(30, 5, generator=g)
    ip = faiss_index.pairwise(q, base, "cosine", chunk_rows=7)
    l2 = faiss_index.pairwise(q, base, "euclidean")
    assert np.allclose(ip, (q @ base.T).numpy(), atol=1e-5)
    assert np.allclose(l2, ((q[:, None] - base[None]) ** 2).sum(-1).numpy(), atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["crt", "lws", "ncm", "tau-norm"])
def test_cuda_matches_cpu(method):
    tr, te = longtail_problem(c=8, nmax=100)
    tr.features = tr.features.half()  # the cached dtype: kept as float16 on the GPU
    opts = {"epochs": 3, "batch_size": 32} if method in ("crt", "lws") else {}  # > 3 full batches: graphed
    cpu = build_head(method, **opts).fit(tr, device="cpu")
    gpu = build_head(method, **opts).fit(tr, device="cuda")
    a, b = cpu.logits(te.features, device="cpu"), gpu.logits(te.features, device="cuda")
    assert torch.allclose(a, b, atol=2e-3, rtol=1e-3)
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.99


def test_crt_step_equals_torch_sgd_on_the_same_stream():
    """The hand-written update is torch.optim.SGD(momentum, weight_decay) on mean cross-entropy."""
    import math

    from ltcli.heads._balanced import BalancedStream

    g = torch.Generator().manual_seed(0)
    n, c, d, bs, lr = 300, 5, 7, 64, 0.3
    x, y = torch.randn(n, d, generator=g), torch.arange(n) % c
    head = build_head("crt", epochs=2, batch_size=bs, lr=lr).fit(make_fs(x, y), device="cpu")

    gen = torch.Generator().manual_seed(0)  # replay: same init draws and the same streams
    bound = 1 / math.sqrt(d)
    lin = torch.nn.Linear(d, c)
    lin.weight.data = (torch.rand((c, d), generator=gen) * 2 - 1) * bound
    lin.bias.data = (torch.rand((c,), generator=gen) * 2 - 1) * bound
    opt = torch.optim.SGD(lin.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    stream, total, step = BalancedStream(y, c, 1, np.random.default_rng(0)), 2 * math.ceil(n / bs), 0
    for _ in range(2):
        ids, lab = stream.epoch()
        for s in range(0, n, bs):
            opt.param_groups[0]["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / total))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(lin(x[ids[s : s + bs]]), lab[s : s + bs]).backward()
            opt.step()
            step += 1
    assert torch.allclose(lin.weight.data, head.weight, atol=1e-6)
    assert torch.allclose(lin.bias.data, head.bias, atol=1e-6)


@pytest.mark.parametrize("method", ["crt", "lws"])
def test_graph_driven_steps_equal_the_plain_loop(monkeypatch, method):
    """The counter-driven step that CUDA graphs replay gives the plain loop's result
    (on the CPU it runs eagerly; test_cuda_matches_cpu covers the captured graph)."""
    from ltcli.heads import _balanced

    tr, _ = longtail_problem(c=8, nmax=100, views=2)
    opts = {"epochs": 3, "batch_size": 32}
    plain = build_head(method, **opts).fit(tr, device="cpu")
    monkeypatch.setattr(_balanced, "USE_GRAPHS", True)
    graphed = build_head(method, **opts).fit(tr, device="cpu")
    assert torch.equal(plain.linear()[0], graphed.linear()[0])


# ---- kNN at scale: indexes and the cache reference ------------------------------------------------
def _clustered(n=6000, c=20, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    modes = torch.randn(c * 4, d, generator=g) * 3
    y = torch.randint(0, c * 4, (n,), generator=g)
    x = modes[y] + torch.randn(n, d, generator=g) * 0.5
    return make_fs(x.half(), y // 4), modes


@pytest.mark.parametrize("index", ["ivf", "hnsw"])
def test_knn_indexes_agree_with_exact_search(index, tmp_path):
    from ltcli.heads import load_head, save_head

    fs, modes = _clustered()
    q = modes[torch.arange(0, 80, 3)] + torch.randn(27, 32, generator=torch.Generator().manual_seed(1)) * 0.5
    exact = build_head("knn").fit(fs).logits(q)
    head = build_head("knn", index=index).fit(fs)
    assert head.recall >= 0.95 and "recall@10" in head.fit_note
    # the note says how the index compares with exact search, and advises flat when it is slower
    pace = re.search(r"([0-9.]+)x (faster|slower) than exact search", head.fit_note)
    assert pace and (pace[2] == "slower") == ("--index flat (the default) is the better choice" in head.fit_note)
    got = head.logits(q)
    assert (got.argmax(1) == exact.argmax(1)).float().mean() >= 0.9
    save_head(head, tmp_path / "k.pt", {})
    assert torch.equal(load_head(tmp_path / "k.pt")[0].logits(q), got)
    # the tie-break's class means are kept at float16 (half the head at iNat size); a head that
    # holds them as float32 (ltcli before this) loads and scores the same
    blob = torch.load(tmp_path / "k.pt", weights_only=True)
    assert blob["state"]["class_means"].dtype == torch.float16
    blob["state"]["class_means"] = blob["state"]["class_means"].float()
    torch.save(blob, tmp_path / "old.pt")
    assert torch.equal(load_head(tmp_path / "old.pt")[0].logits(q), got)
    if index == "ivf":
        # the lists' centroids are stored apart, at float16, and the index without them; a head
        # that keeps them inside its index (ltcli before this) loads and scores the same
        state = blob["state"]
        centroids = state["list_centroids"]
        assert centroids.dtype == torch.float16 and centroids.shape[1] == 32
        inner = neighbours.deserialize(state["index"].numpy(), state["index_sha256"], "test")
        assert faiss_index._faiss().extract_index_ivf(inner).quantizer.ntotal == 0
        neighbours.put_centroids(inner, centroids.numpy())
        data, state["index_sha256"] = neighbours.serialize(inner)
        state["index"] = torch.from_numpy(data.copy())
        del state["list_centroids"]
        torch.save(blob, tmp_path / "old-ivf.pt")
        old = load_head(tmp_path / "old-ivf.pt")[0]
        assert old.list_centroids is None and torch.equal(old.logits(q), got)
        state["list_centroids"] = centroids[:-1]  # a damaged head: refused in one line
        torch.save(blob, tmp_path / "bad-ivf.pt")
        with pytest.raises(LtcliError, match="'list_centroids' is"):
            load_head(tmp_path / "bad-ivf.pt")[0].logits(q)


@pytest.mark.parametrize("n,d,metric", [(10, 30, "cosine"), (300, 30, "euclidean"), (3000, 64, "cosine")])
def test_ivf_reaches_the_recall_target_on_unstructured_features(n, d, metric, tmp_path):
    """Gaussian noise has no clusters and 4-bit codes rank it poorly: the fit must still reach
    recall 0.95, by visiting more lists and then re-ranking more candidates, whatever D (D = 30
    is padded to a multiple of 4) and however few rows (fewer than a sub-quantiser's 16 centroids)."""
    from ltcli.heads import load_head, save_head

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, d, generator=g), torch.randint(0, 5, (n,), generator=g)
    fs = make_fs(x.half(), y)
    head = build_head("knn", index="ivf", metric=metric).fit(fs)
    assert head.recall >= 0.95, head.fit_note
    if n == 3000:  # codes this coarse need a deeper re-rank than the default, and say so
        assert head.depth > neighbours.default_depth(10) and "candidates re-ranked" in head.fit_note
    exact = build_head("knn", metric=metric).fit(fs).logits(x[:200])
    got = head.logits(x[:200])
    assert (got.argmax(1) == exact.argmax(1)).float().mean() >= 0.95
    save_head(head, tmp_path / "k.pt", {})
    loaded = load_head(tmp_path / "k.pt")[0]
    assert (loaded.knob, loaded.depth) == (head.knob, head.depth)
    assert torch.equal(loaded.logits(x[:200]), got)


def test_a_lower_recall_target_buys_a_cheaper_search(tmp_path):
    """--recall trades neighbours for speed: on the same features a lower target stops at fewer
    lists (and re-ranks no deeper), still reaches the target it was given, and the head keeps it."""
    from ltcli.heads import load_head, save_head

    g = torch.Generator().manual_seed(0)
    fs = make_fs(torch.randn(3000, 64, generator=g).half(), torch.randint(0, 5, (3000,), generator=g))
    strict = build_head("knn", index="ivf").fit(fs)
    loose = build_head("knn", index="ivf", recall=0.5).fit(fs)
    assert loose.recall >= 0.5 and strict.recall >= 0.95
    assert loose.knob < strict.knob and loose.depth <= strict.depth
    save_head(loose, tmp_path / "k.pt", {})
    assert load_head(tmp_path / "k.pt")[0].options["recall"] == 0.5
    with pytest.raises(LtcliError, match="--recall 1.5"):
        build_head("knn", index="ivf", recall=1.5)


def test_ivf_recall_is_measured_on_held_out_queries_when_fit_has_them():
    """Queries unlike the train rows (here between the modes, whose neighbours lie in many lists)
    need a deeper search than train rows do: tuned on such held-out queries, the index reaches
    the target on new ones; tuned on train rows alone, it falls short on them. Held-out features
    of another shape are refused."""
    fs, _ = _clustered()

    def between_modes(m, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(m, 32, generator=g) * 3, torch.randint(0, 20, (m,), generator=g)

    val = make_fs(*between_modes(600, 1), split="val", names=fs.class_names)
    new, _ = between_modes(1000, 2)

    def recall_on_new(head):
        q = head._queries(new, 0, "new")
        _, exact = neighbours.exact_search(q, head._chunks, 10, "cosine")
        return neighbours.recall_at(head._search(q, 10, head.knob, head.depth)[1], exact)

    plain = build_head("knn", index="ivf").fit(fs)
    tuned = build_head("knn", index="ivf").fit(fs, held_out=val)
    assert "train queries, each without itself" in plain.fit_note
    assert "class-balanced val queries" in tuned.fit_note and tuned.recall >= 0.95
    assert tuned.knob > plain.knob and recall_on_new(tuned) >= 0.93 > recall_on_new(plain)
    assert getattr(tuned, "_held_out", None) is None  # the head keeps no reference to it
    # fit-head opens the val split only for an approximate index (exact search measures nothing)
    assert build_head("knn", index="hnsw").uses_held_out and not build_head("knn").uses_held_out
    with pytest.raises(LtcliError, match="held-out features must have the train features' D"):
        build_head("knn", index="ivf").fit(fs, held_out=make_fs(torch.zeros(10, 8), torch.arange(10) % 20))
    broken = val.features.clone()
    broken[:, 3] = float("nan")  # every row: whichever the fit draws, it is refused by its number
    with pytest.raises(LtcliError, match=r"val features: features contain NaN or inf \(row \d+\)"):
        build_head("knn", index="ivf").fit(fs, held_out=make_fs(broken, val.labels, split="val", names=fs.class_names))


def test_fit_head_checks_an_index_on_the_runs_val_split(tiny_pipeline, tmp_path):
    """`fit-head --method knn --index ivf` measures recall on the run's val features; given train
    features by --features (no run split beside them) it measures on train rows."""
    from conftest import check_ok, run_cli

    run = tiny_pipeline
    got = check_ok(run_cli(["fit-head", "--run", run, "--method", "knn", "--index", "ivf", "--out",
                            tmp_path / "val.pt"]))
    assert "class-balanced val queries" in " ".join(got.err.split()), got.err  # (the console wraps lines)
    got = check_ok(run_cli(["fit-head", "--run", run, "--method", "knn", "--index", "ivf", "--features",
                            run / "features" / "train.h5", "--out", tmp_path / "train.pt"]))
    assert "class-balanced train queries, each without itself" in " ".join(got.err.split()), got.err


def _search_finding(share, spread: bool = False):
    """A fake index search finding share(knob) % of the neighbours: every query the same share of
    its 100 (spread=False), or that share of the queries all of theirs and the rest none
    (spread=True: the same mean, far less sure)."""
    calls = []

    def search(queries, knob, depth):
        calls.append(knob)
        found, got = np.full((100, 100), -1), min(100, int(share(knob) + 1e-9))
        if spread:
            found[:got] = np.arange(100)
        else:
            found[:, :got] = np.arange(got)
        return found

    return search, calls


@pytest.mark.parametrize("needed,limit,expected", [(665, 4096, 704), (10, 4096, 10), (0.5, 4096, 1),
                                                   (1.5, 4096, 2), (665, 600, 600)])
def test_tune_knob_bisects_between_powers_of_two(needed, limit, expected):
    """The knob is the first power of two to reach recall 0.95, narrowed by three bisections
    towards the last one short of it (512 -> 1024 -> 768, 640, 704 for 665); reached at the
    first value, it stays; stopped by the limit, the re-rank deepens instead (here to every row,
    since this search ignores the depth)."""
    search, calls = _search_finding(lambda knob: knob * 95 / needed)  # recall 0.95 from knob = needed
    truth = np.tile(np.arange(100), (100, 1))
    knob, depth, recall, bound = neighbours.tune_knob(search, "ivf", np.zeros((100, 4)), truth, limit, 10, 10_000)
    assert knob == expected and bound == pytest.approx(recall)  # every query alike: no doubt about the mean
    assert (recall >= 0.95, depth) == ((True, neighbours.default_depth(10)) if needed < limit else (False, 10_000))
    repeats = len(calls) - len(set(calls))  # each knob searched once, but the limit's as the re-rank deepens
    assert all(c <= limit for c in calls) and repeats == (0 if needed < limit else calls.count(limit) - 1)


def test_tune_knob_wants_the_target_with_confidence():
    """Where queries' recalls vary, a sample's mean of 0.95 may be a population's 0.93: the knob
    grows until the mean's lower 95 % bound reaches the target (mean 0.98 of 100 queries that
    find all or none: 768, where every query alike reaches 0.95 at 665 -> 704)."""
    share = lambda knob: 95 * (knob / 665) ** 0.25  # noqa: E731 - 95 % at 665, 98 % at 753
    truth = np.tile(np.arange(100), (100, 1))
    alike = neighbours.tune_knob(_search_finding(share)[0], "ivf", np.zeros((100, 4)), truth, 4096, 10, 10_000)
    knob, _, recall, bound = neighbours.tune_knob(_search_finding(share, spread=True)[0], "ivf",
                                                  np.zeros((100, 4)), truth, 4096, 10, 10_000)
    assert alike[0] == 704 and knob == 768 and recall == 0.98 and bound >= 0.95
    hits = (np.arange(100) < 98).astype(float)
    assert bound == pytest.approx(hits.mean() - 1.645 * hits.std(ddof=1) / 10)
    assert neighbours.recall_bound((np.arange(100) < 96).astype(float)) < 0.95  # why 704 (96 %) was not enough
    from statistics import NormalDist  # the fit note's "95% confidence" and the bound's z are one fact

    assert neighbours.CONFIDENCE_Z == pytest.approx(NormalDist().inv_cdf(neighbours.CONFIDENCE), abs=1e-3)


def test_ivf_head_of_an_earlier_version_asks_for_a_refit(tmp_path):
    from ltcli.heads import load_head, save_head

    fs, _ = _clustered(n=600)
    save_head(build_head("knn", index="ivf").fit(fs), tmp_path / "k.pt", {})
    blob = torch.load(tmp_path / "k.pt", weights_only=True)
    state = blob["state"]
    for key in ("index", "index_sha256", "depth"):
        state.pop(key)
    state.update(centroids=torch.zeros(4, 32), lists=torch.zeros(600, dtype=torch.int32))  # the old layout
    torch.save(blob, tmp_path / "old.pt")
    with pytest.raises(LtcliError, match="an ivf kNN head of an earlier ltcli.*refit it"):
        load_head(tmp_path / "old.pt")


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("case", ["gaussian", "clustered", "near-ties", "k-over-a-chunk", "bank-under-k"])
def test_bf16_pruned_exact_search_finds_what_float32_finds(case, monkeypatch):
    """Exact search that scores chunks in bfloat16 first and rescores only the rows within the
    proven error of each query's k-th best must return the float32 search's neighbours and
    scores: on plain features, on clustered ones (many rows near the k-th best), on near-ties
    everywhere (the all-float32 fallback), with k above a chunk's rows, and with fewer rows than k."""
    rng = np.random.default_rng(0)
    d, n, k, step = 64, 6000, 10, 1000
    if case == "gaussian":
        bank, q = _unit(rng.standard_normal((n, d))), _unit(rng.standard_normal((300, d)))
    elif case == "clustered":
        centres = rng.standard_normal((20, d))
        bank = _unit(centres[rng.integers(20, size=n)] + 0.2 * rng.standard_normal((n, d)))
        q = _unit(centres[rng.integers(20, size=300)] + 0.2 * rng.standard_normal((300, d)))
    elif case == "near-ties":  # every row nearly the same direction: all within the error of each other
        bank = _unit(1.0 + 1e-3 * rng.standard_normal((n, d)))
        q = _unit(1.0 + 1e-3 * rng.standard_normal((300, d)))
    elif case == "k-over-a-chunk":
        bank, q, k = _unit(rng.standard_normal((n, d))), _unit(rng.standard_normal((50, d))), 1500
    else:
        bank, q, k = _unit(rng.standard_normal((7, d))), _unit(rng.standard_normal((50, d))), 10

    def chunks():
        for s in range(0, len(bank), step):
            yield s, bank[s : s + step]

    found = {}
    for prune in (False, True):
        monkeypatch.setattr(neighbours, "PRUNE_WITH_BF16", prune)
        found[prune] = neighbours.exact_search(q, chunks, k, "cosine")
    (d32, i32), (d16, i16) = found[False], found[True]
    if case == "bank-under-k":
        assert (i16[:, 7:] == -1).all() and (i32[:, 7:] == -1).all()
    np.testing.assert_allclose(d16, d32, atol=1e-6)
    if case != "near-ties":  # (where scores tie to the last bit, which tied row comes first is free)
        assert np.array_equal(np.sort(i16, 1), np.sort(i32, 1))


def test_bf16_error_bounds_the_bfloat16_products():
    """The bound pruning relies on holds for random unit vectors, for vectors whose mass sits in
    a few coordinates (the worst rounding) and for long sums of equal terms."""
    rng = np.random.default_rng(0)
    for d in (64, 2048):
        spiky = np.zeros((64, d))
        spiky[np.arange(64), rng.integers(d, size=64)] = 1.0 + rng.random(64) * 2.0**-7
        for x in (_unit(rng.standard_normal((256, d))), _unit(np.abs(rng.standard_normal((256, d)))),
                  _unit(spiky + 1e-3 * rng.standard_normal((64, d))), _unit(np.ones((4, d)))):
            exact = x.astype(np.float64) @ x.T.astype(np.float64)
            t = torch.from_numpy(x).bfloat16()
            approx = (t @ t.T).double().numpy()
            assert np.abs(approx - exact).max() <= neighbours.bf16_error(d)


def test_knn_head_refers_to_the_train_cache(tiny_pipeline, tmp_path):
    from conftest import check_ok, copy_run, run_cli

    run = copy_run(tiny_pipeline, tmp_path / "run")
    check_ok(run_cli(["fit-head", "--run", run, "--method", "knn"]))
    head = run / "heads" / "knn.pt"
    assert head.stat().st_size * 10 < (run / "features" / "train.h5").stat().st_size  # no bank copied
    moved = tmp_path / "moved"
    run.rename(moved)  # the run moves as a whole: its head finds its features beside it
    check_ok(run_cli(["eval", "--run", moved, "--heads", "knn"]))
    (moved / "features" / "train.h5").unlink()
    r = run_cli(["eval", "--run", moved, "--heads", "knn"])
    assert r.code == 2 and "the train features this kNN head searches are missing" in r.err


def test_knn_head_of_a_copied_run_finds_its_own_features(tiny_pipeline, tmp_path):
    """A run copied elsewhere, and another cache written at the original's place: the copy's
    head searches the copy's features (the ones its checksum names); the original refuses."""
    import shutil

    from conftest import check_ok, copy_run, run_cli

    run = copy_run(tiny_pipeline, tmp_path / "run")
    check_ok(run_cli(["fit-head", "--run", run, "--method", "knn"]))
    check_ok(run_cli(["eval", "--run", run, "--heads", "knn", "--json"]))
    before = (run / "reports" / "eval-test.json").read_text()
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.copyfile(run / "features" / "val.h5", run / "features" / "train.h5")  # other rows at the old path
    (copy / "reports" / "eval-test.json").unlink()
    check_ok(run_cli(["eval", "--run", copy, "--heads", "knn", "--json"]))
    after = json.loads((copy / "reports" / "eval-test.json").read_text())["heads"]
    assert after["knn"]["overall"] == json.loads(before)["heads"]["knn"]["overall"]
    r = run_cli(["eval", "--run", run, "--heads", "knn"])
    assert r.code == 2 and "not the train features this kNN head was fitted on" in r.err
