"""Every registered head, checked the same way (as scikit-learn's common estimator checks):
each option's bad values refused with its flag named, fit on single- and multi-view features,
output shapes, a state round trip through a head file, the linear form where declared, and
the command line and quickstart derived from the registry. Head names appear only in the
registry: a head added as one module is checked here without touching this file."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO, cli_env
from ltcli.errors import LtcliError
from ltcli.featureset import FeatureSet
from ltcli.heads import HEADS, build_head, load_head, methods, save_head
from ltcli.options import Opt


def features(n=120, c=4, d=8, views=1, seed=0) -> FeatureSet:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % c
    mu = torch.randn(c, d, generator=g) * 3
    shape = (n, views, d) if views > 1 else (n, d)
    noise = torch.randn(shape, generator=g)
    x = (mu[y].unsqueeze(1) if views > 1 else mu[y]) + noise
    w, b = torch.randn(c, d, generator=g), torch.randn(c, generator=g)
    counts = torch.tensor([40, 30, 20, 10])[:c]
    return FeatureSet(x, y, w, b, [f"c{i}" for i in range(c)], counts, "train", {})


def bad_values(o: Opt) -> list:
    """Values every Opt of this kind must refuse."""
    out: list = ["not-a-value"] if o.kind in (int, float, bool) else [3.5]
    if o.kind in (int, float):
        if o.kind is float:
            out.append(float("nan"))
        if o.positive:
            out.append(0)
        if o.min is not None:
            out.append(o.min - 1)
        if o.below is not None:
            out.append(o.below)
        if o.max is not None:
            out.append(o.max + 1 if o.kind is int else o.max * 2 + 1)
    if o.choices:
        out.append("no-such-choice")
    return out


OPTIONS = [(m, name, o) for m in methods() for name, o in HEADS[m].options_spec.items()]


@pytest.mark.parametrize("method,name,o", OPTIONS, ids=[f"{m}-{n}" for m, n, _ in OPTIONS])
def test_bad_option_values_name_the_flag(method, name, o):
    flag = "--" + name.replace("_", "-")
    for value in bad_values(o):
        with pytest.raises(LtcliError) as err:
            build_head(method, **{name: value})
        assert str(err.value).startswith(flag), (value, str(err.value))
    build_head(method, **{name: o.default})  # the default itself is accepted


@pytest.mark.parametrize("method", methods())
def test_option_of_another_head_is_refused(method):
    foreign = next((n for m in methods() for n in HEADS[m].options_spec if n not in HEADS[method].options_spec), None)
    if foreign is None:
        pytest.skip("this head takes every option")
    with pytest.raises(LtcliError, match=f"--{foreign.replace('_', '-')}: does not apply to --method {method}"):
        build_head(method, **{foreign: HEADS[next(m for m in methods() if foreign in HEADS[m].options_spec)]
                              .options_spec[foreign].default})


@pytest.mark.parametrize("views", [1, 3])
@pytest.mark.parametrize("method", methods())
def test_fit_shapes_and_state_round_trip(method, views, tmp_path):
    fs = features(views=views)
    head = build_head(method, **HEADS[method].fast_options).fit(fs, device="cpu")
    scores = head.logits(fs.features)
    assert scores.shape == (len(fs.labels), fs.num_classes) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    path = tmp_path / f"{method}.pt"
    save_head(head, path, {"method": method})
    loaded, prov = load_head(path)
    assert prov["method"] == method and loaded.options == head.options
    torch.testing.assert_close(loaded.logits(fs.features), scores, rtol=0, atol=0)
    # separable data: every head beats chance by far
    uses_stage1 = HEADS[method].needs_classifier or HEADS[method].baseline  # the random classifier above
    assert (scores.argmax(1) == fs.labels).float().mean() > 0.5 or uses_stage1


@pytest.mark.parametrize("method", methods())
def test_declared_linear_form(method):
    fs = features()
    head = build_head(method, **HEADS[method].fast_options).fit(fs, device="cpu")
    lin = head.linear()
    if not HEADS[method].linear_form:
        assert lin is None
        return
    w, b = lin
    want = fs.features @ w.T + (0 if b is None else b)
    torch.testing.assert_close(head.logits(fs.features), want, rtol=1e-5, atol=1e-5)


def test_registry_declares_one_baseline_and_tunable_heads():
    assert sum(HEADS[m].baseline for m in methods()) == 1
    for m in methods():
        h = HEADS[m]
        assert h.summary and h.method == m
        if h.tunable:
            assert "tau" in h.options_spec and hasattr(h, "sweep_terms")
        for name, o in h.options_spec.items():
            assert isinstance(o, Opt) and o.help, (m, name)
            if isinstance(o.default, float):
                assert math.isfinite(o.default)


def test_fit_head_help_lists_every_head_and_option():
    out = subprocess.run([sys.executable, "-m", "ltcli", "fit-head", "--help"], capture_output=True, text=True,
                         env=cli_env(COLUMNS="200")).stdout
    for m in methods():
        assert m in out
        for name in HEADS[m].options_spec:
            assert "--" + name.replace("_", "-") in out, name


NEW_HEAD = textwrap.dedent('''
    import torch
    from ltcli.heads.linear import LinearHead
    from ltcli.heads.registry import register
    from ltcli.options import Opt

    @register
    class PriorOnly(LinearHead):
        """Scores every class by its train prior alone (a deliberately silly head)."""
        method = "prior-only"
        order = 99
        summary = "the train prior, whatever the image"
        options_spec = {"strength": Opt(1.0, float, "how much prior", min=0.0)}

        def _fit(self, train, device, progress):
            counts = train.train_counts.to(torch.float32)
            self.weight = torch.zeros(self.num_classes, self.dim)
            self.bias = self.options["strength"] * (counts / counts.sum()).log()
            self._reset_cache()
''')


@pytest.mark.slow
def test_a_new_head_is_one_module_and_one_line(tmp_path):
    """A head in its own module, registered by importing it, appears in fit-head --help,
    fit-head --method, quickstart's table and eval."""
    (tmp_path / "my_head.py").write_text(NEW_HEAD)
    script = ("import sys, my_head\nfrom ltcli.cli import main\nmain(sys.argv[1:])\n")
    env = cli_env(PYTHONPATH=f"{tmp_path}:{REPO}", COLUMNS="200")

    def ltcli(*args):
        return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=600)

    help_text = ltcli("fit-head", "--help").stdout
    assert "prior-only" in help_text and "--strength" in help_text
    run = tmp_path / "run"
    proc = ltcli("quickstart", "--run", run, "--epochs", 1, "--synthetic-classes", 5, "--synthetic-size", 16,
                 "--device", "cpu", "--workers", 0, "--grid", "0,1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "heads" / "prior-only.pt").is_file()
    assert "prior-only" in proc.stderr  # in the table
    proc = ltcli("fit-head", "--run", run, "--method", "prior-only", "--strength", 2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = ltcli("eval", "--run", run, "--json")
    import json

    assert "prior-only" in json.loads(proc.stdout)["heads"]
