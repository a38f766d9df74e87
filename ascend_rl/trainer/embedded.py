"""The embedded default's assets, built on first use and reused from the cache afterwards:
the tiny base model, the arithmetic data, and the SFT warm-up of the model on that data.

They live only in ascend-rl's own cache (`embedded.yaml` points there): nothing here reads the config's
paths, so a user's `data.train_files` or model path is never written, whatever else the command line says.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ascend_rl.config.loader import cache_dir
from ascend_rl.files import new_dir

log = logging.getLogger(__name__)

# The SFT warm-up stops as soon as 30% of held-out answers are right: RL needs a model that is sometimes
# right, and one that is always right has nothing left to learn. (Accuracy rises steeply during SFT, so
# a fixed number of epochs would land anywhere between 10% and 95%.)
SFT_MAX_EPOCHS = 30.0
SFT_LR = 3e-3
SFT_STOP_AT_EXACT_MATCH = 0.3
SFT_HOLDOUT = 200


def embedded_dir() -> Path:
    return cache_dir() / "embedded-v1"


def ensure_embedded_assets(seed: int) -> Path:
    """Build what is missing under `embedded_dir()` (each asset whole or not at all) and return it."""
    from ascend_rl.data.tasks import write_arithmetic
    from ascend_rl.data.tiny_model import build_tiny_model
    from ascend_rl.sft import SFTSettings, run_sft

    root = embedded_dir()
    data_dir, base_model, sft_model = root / "arithmetic", root / "tiny-qwen3", root / "tiny-qwen3-sft"
    if not data_dir.exists():
        log.info("embedded default: writing the arithmetic task to %s", data_dir)
        with new_dir(data_dir, "the embedded default") as tmp:  # all three files or none
            write_arithmetic(tmp, seed=0)
    if not sft_model.exists():
        if not base_model.exists():
            log.info("embedded default: building the tiny model in %s", base_model)
            build_tiny_model(base_model)
        log.info("embedded default: SFT warm-up into %s (once; reused afterwards)", sft_model)
        run_sft(SFTSettings(str(base_model), (str(data_dir / "sft.parquet"),), str(sft_model),
                            epochs=SFT_MAX_EPOCHS, lr=SFT_LR, batch_size=64, seed=seed,
                            holdout=SFT_HOLDOUT, stop_at_exact_match=SFT_STOP_AT_EXACT_MATCH))
    return root
