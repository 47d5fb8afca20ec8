"""`joint`: the stage-1 classifier stored in the features file, as it is.

Features whose backbone ltcli did not train have no stage-1 classifier; the baseline is then
an instance-balanced linear probe fitted on them (the cRT recipe with instance sampling:
every train sample once per epoch), which `ltcli extract --arch` and `import-features` write
into the cache so that the heads built on a stage-1 classifier work unchanged."""

from __future__ import annotations

from ..featureset import FeatureSet
from .crt import CRTHead
from .linear import LinearHead
from .registry import register

PROBE = {"sampling": "instance"}  # with cRT's defaults: 10 epochs, batch 512, lr 0.2, wd 5e-4


@register
class JointHead(LinearHead):
    method = "joint"
    order = 0
    summary = "the stage-1 classifier as trained (the baseline; a linear probe when there is none)"
    options_spec = {}
    baseline = True
    linear_form = True
    shows_weight_norms = True

    def _fit(self, train: FeatureSet, device, progress) -> None:
        if train.weight is None:
            probe = CRTHead(**PROBE)
            probe.fit(train, device=device, progress=progress)
            self.weight, self.bias = probe.weight, probe.bias
            self.stage1_note = "linear probe (cRT recipe, instance sampling, " + \
                f"{probe.options['epochs']} epochs, seed {probe.options['seed']})"
        else:
            self._check_classifier(train)
            self._copy_stage1(train)
            self.stage1_note = str(train.attrs.get("stage1") or "trained")
        self._reset_cache()
