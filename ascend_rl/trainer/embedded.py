"""The embedded default's assets, built on first use and reused from the cache afterwards:
the tiny base model, the arithmetic data, and the SFT warm-up of the model on that data."""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig

# The SFT warm-up stops as soon as 30% of held-out answers are right: RL needs a model that is sometimes
# right, and one that is always right has nothing left to learn. (Accuracy rises steeply during SFT, so
# a fixed number of epochs would land anywhere between 10% and 95%.)
SFT_MAX_EPOCHS = 30.0
SFT_LR = 3e-3
SFT_STOP_AT_EXACT_MATCH = 0.3
SFT_HOLDOUT = 200


def ensure_embedded_assets(cfg: DictConfig, log=lambda m: print(m, file=sys.stderr)) -> None:
    from ascend_rl.data.tasks import write_arithmetic
    from ascend_rl.data.tiny_model import build_tiny_model
    from ascend_rl.sft import SFTSettings, run_sft

    sft_model = Path(cfg.actor_rollout_ref.model.path)
    data_dir = Path(cfg.data.train_files).parent
    base_model = sft_model.with_name("tiny-qwen3")
    if not (data_dir / "sft.parquet").is_file():
        log(f"embedded default: writing the arithmetic task to {data_dir}")
        write_arithmetic(data_dir, seed=0)
    if not (sft_model / "config.json").is_file():
        if not (base_model / "config.json").is_file():
            log(f"embedded default: building the tiny model in {base_model}")
            build_tiny_model(base_model)
        log(f"embedded default: SFT warm-up into {sft_model} (once; reused afterwards)")
        run_sft(SFTSettings(str(base_model), (str(data_dir / "sft.parquet"),), str(sft_model),
                            epochs=SFT_MAX_EPOCHS, lr=SFT_LR, batch_size=64, seed=cfg.trainer.seed,
                            holdout=SFT_HOLDOUT, stop_at_exact_match=SFT_STOP_AT_EXACT_MATCH))
