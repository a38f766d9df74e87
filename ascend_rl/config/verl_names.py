"""Names verl 0.9.1 registers for values of its config keys (read from its source: `trainer/ppo/core_algos.py`,
`utils/tracking.py`, `utils/profiler/`, `workers/reward_manager/`, `experimental/reward_loop/reward_manager/`). A name verl knows and ascend-rl does not build is *not built* (plan lists
it, `train` stops naming it), never an unknown value; only a name neither knows is a typo."""

from __future__ import annotations

ADV_ESTIMATORS = ("gae", "grpo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "remax", "rloo", "opo",
                  "grpo_passk", "gpg", "rloo_vectorized", "grpo_vectorized", "optimal_token_baseline",
                  "tir_optimal_token_baseline", "gdpo")
POLICY_LOSSES = ("vanilla", "dppo_tv", "dppo_kl", "gspo", "sapo", "gpg", "clip_cov", "kl_cov", "geo_mean", "dro",
                 "cispo", "bypass_mode")
LOGGERS = ("wandb", "mlflow", "swanlab", "vemlp_wandb", "tensorboard", "console", "clearml", "trackio", "file",
           "rl_insight")
REWARD_MANAGERS = ("naive", "dapo", "batch", "prime", "remote", "gdpo")  # reward_manager/ and reward_loop/
PROFILER_TOOLS = ("nsys", "npu", "torch", "torch_memory", "precision_debugger")
