"""`plain`: the model run in the clear by the torch executor — the reference every scheme is
checked against. (The shortest scheme: docs/architecture.md uses it as the worked example.)"""

from __future__ import annotations

from veil.backends.plain import TorchOps
from veil.model.opening import OpenedModel
from veil.schemes.base import NoOptions, Placement, Scheme, StepSession, Tolerance


def _open(opened: OpenedModel, options: NoOptions) -> StepSession:
    return StepSession("plain", opened.cfg, TorchOps(opened.cfg, opened.weights))


PLAIN = Scheme(
    name="plain", system="— (reference oracle)", protects="nothing", trusted="—", sees="everything",
    kind="host",
    status="**implemented**", options=NoOptions, support=TorchOps.support,
    placement=(Placement("everything", "host", "—", "—", "no protection: the host sees all"),),
    tolerance=Tolerance(tiny=0.0, default=0.0), open=_open)
