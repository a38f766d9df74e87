"""ServerArgs with SGLang 0.5.8's field names (a dataclass, as SGLang's was up to 0.5.19)."""

import dataclasses

from ascend_rl.rollout.sglang.fields import snapshot_fields

ServerArgs = dataclasses.make_dataclass(
    "ServerArgs", [(name, object, dataclasses.field(default=None)) for name in sorted(snapshot_fields("0.5.8").names)])
