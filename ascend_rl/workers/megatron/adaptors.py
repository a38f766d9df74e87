"""What makes Megatron-core run on each kind of device, applied in a worker before any Megatron module is built:
our patches on a CPU (`cpu_patches`), MindSpeed's adaptor on an Ascend NPU (it patches Megatron's modules and
maps `torch.cuda` to the NPU, so it has to come first); on CUDA Megatron runs as it ships."""

from __future__ import annotations

import importlib.util
import logging

from ascend_rl.workers.megatron import cpu_patches
from ascend_rl.workers.megatron.model import MegatronParallel, transformer_overrides_for_megatron

log = logging.getLogger(__name__)

MINDSPEED_INSTALL = "USE_MEGATRON=1 bash scripts/install_sglang_npu.sh installs the pinned MindSpeed"


def adapt(device_type: str, parallel: MegatronParallel) -> None:
    ADAPTORS.get(device_type, lambda _: None)(parallel)


def missing(device_type: str) -> str | None:
    """What this device kind's adaptor needs and this machine lacks, in one line (None: nothing)."""
    if device_type == "npu" and importlib.util.find_spec("mindspeed") is None:
        return f"Megatron on Ascend NPUs runs through MindSpeed, which is not installed: {MINDSPEED_INSTALL}"
    return None


def _cpu(parallel: MegatronParallel) -> None:
    cpu_patches.apply()


def _mindspeed(parallel: MegatronParallel) -> None:
    """MindSpeed's adaptor, then its `repatch` with the run's override_transformer_config, as verl's MindSpeed
    engine does before building the process groups: MindSpeed's fused attention unless the batch-invariant one
    is asked for (both patch the same forward)."""
    if (problem := missing("npu")) is not None:
        raise RuntimeError(problem)
    import mindspeed.megatron_adaptor as adaptor  # importing it applies MindSpeed's patches

    repatch = getattr(adaptor, "repatch", None)
    if repatch is None:  # verl goes on without it too
        log.warning("this MindSpeed has no megatron_adaptor.repatch: its features follow its defaults, not "
                    "override_transformer_config (the pinned branch is in ascend_rl/versions.toml)")
        return
    config = transformer_overrides_for_megatron(parallel.override_transformer_config)
    if config.get("use_flash_attn_npu_batch_invariant"):
        config["use_flash_attn"] = False
    else:
        config.setdefault("use_flash_attn", True)
    repatch(config)


def _cuda(parallel: MegatronParallel) -> None:
    if importlib.util.find_spec("transformer_engine") is not None:
        log.info("Transformer Engine is installed; the Megatron engine builds Megatron's local layer spec, whose "
                 "weights its converter knows (Transformer Engine's spec is not built)")


ADAPTORS = {"cpu": _cpu, "npu": _mindspeed, "cuda": _cuda}
