"""Start-up checks that need files or packages but no device: `plan` lists them all at once with the missing
inputs (`train` stops on them before building anything), each naming the key to change.

- the prompt and response fit the model's context (config.json's max_position_embeddings, or rollout.max_model_len);
- the model's attention heads (and KV heads) divide over the Ulysses group;
- every `trainer.logger` has its package;
- the custom reward file imports and defines its function (imported in a child process: it is the user's code,
  and may hang or exit);
- every `data_source` of the data has a scorer, when no custom reward function scores them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig

from ascend_rl.config.features import critic_in_use
from ascend_rl.config.validate import data_files, plain_map
from ascend_rl.platform import resolve_device
from ascend_rl.reward.scorers import scorer_for
from ascend_rl.workers.megatron import adaptors
from ascend_rl.workers.megatron.arch import architecture
from ascend_rl.workers.megatron.convert import check_layout
from ascend_rl.workers.megatron.engine import unknown_overrides
from ascend_rl.workers.megatron.model import MegatronParallel

A = "actor_rollout_ref"
LOGGER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # console needs nothing
REWARD_IMPORT_TIMEOUT_S = 60


def preflight(cfg: DictConfig) -> list[str]:
    return [*context_problems(cfg), *sequence_parallel_problems(cfg), *megatron_problems(cfg), *logger_problems(cfg),
            *reward_function_problems(cfg), *scorer_problems(cfg)]


def context_problems(cfg: DictConfig) -> list[str]:
    """A prompt and its response must fit the rollout's context, as verl checks max_model_len."""
    data, ro = cfg.data, cfg[A].rollout
    context, source = ro.max_model_len, f"{A}.rollout.max_model_len"
    if context is None:
        config = Path(str(cfg[A].model.path or "")).expanduser() / "config.json"
        try:
            context = json.loads(config.read_text()).get("max_position_embeddings")
        except (OSError, ValueError, AttributeError):
            return []  # no model here (plan) or not readable: the model check says so
        source = f"the model's max_position_embeddings ({config})"
    if context is None or data.max_prompt_length + data.max_response_length <= context:
        return []
    return [f"data.max_prompt_length={data.max_prompt_length} + data.max_response_length={data.max_response_length} "
            f"exceeds the rollout context of {context} tokens ({source}); shorten them or raise "
            f"{A}.rollout.max_model_len"]


def sequence_parallel_problems(cfg: DictConfig) -> list[str]:
    """Ulysses gives each rank of a group a share of the heads: query and KV heads must divide by its size."""
    sp = cfg[A].actor.get("ulysses_sequence_parallel_size", 1)
    models = {f"{A}.model.path": cfg[A].model.path}
    if critic_in_use(cfg):
        models["critic.model.path"] = cfg.critic.model.path
    problems = []
    for key, path in models.items() if sp > 1 else ():
        config = _model_config(path)
        for heads in ("num_attention_heads", "num_key_value_heads"):
            if (n := config.get(heads)) and n % sp:
                problems.append(f"{A}.actor.ulysses_sequence_parallel_size={sp} does not divide the {n} {heads} of "
                                f"{key} ({path}): Ulysses gives each rank of its group a share of the heads")
    return problems


def megatron_problems(cfg: DictConfig) -> list[str]:
    """What would stop a Megatron run's workers as they start: megatron-core missing (or MindSpeed on an NPU), a
    model the converter does not know or whose heads, experts or MLP do not split over the layout, an attention
    backend the environment contradicts, an override Megatron's config dataclass has no field for."""
    if cfg[A].actor.strategy != "megatron":
        return []
    if importlib.util.find_spec("megatron.core") is None:
        return [f"{A}.actor.strategy=megatron needs megatron-core: pip install -e '.[megatron]'"]
    m, problems = cfg[A].actor.megatron, []
    device = resolve_device(cfg.trainer.device)  # unset: what this machine has
    if (missing := adaptors.missing(device)) is not None:
        problems.append(f"trainer.device={device} with {A}.actor.strategy=megatron: {missing}")
    parallel = MegatronParallel(tensor_model_parallel_size=m.tensor_model_parallel_size,
                                pipeline_model_parallel_size=m.pipeline_model_parallel_size,
                                expert_model_parallel_size=m.expert_model_parallel_size,
                                expert_tensor_parallel_size=m.expert_tensor_parallel_size)
    try:
        parallel.check_world(cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node)
    except ValueError as err:
        problems.append(f"{A}.actor.megatron: {err} (trainer.nnodes × trainer.n_gpus_per_node)")
    if _model_config(cfg[A].model.path):  # else the model check says what is missing
        import transformers

        try:
            check_layout(architecture(transformers.AutoConfig.from_pretrained(Path(cfg[A].model.path).expanduser())),
                         parallel.tp, parallel.ep, parallel.etp, parallel.pp)
        except (NotImplementedError, ValueError) as err:
            problems.append(f"{A}.model.path={cfg[A].model.path} on Megatron's layout ({A}.actor.megatron): {err}")
    problems += attention_backend_problems(cfg, os.environ)
    for key, fields in unknown_overrides(plain_map(m.override_transformer_config), plain_map(m.override_ddp_config),
                                         plain_map(cfg[A].actor.optim.get("override_optimizer_config"))).items():
        problems.append(f"{A}.{key}: Megatron has no field {', '.join(fields)}")
    return problems


# What Megatron's LanguageModule._set_attention_backend asserts of Transformer Engine's variables for each
# attention_backend (FLASH, FUSED, UNFUSED); unset is fine (it sets them). The workers inherit this environment.
NVTE_ATTENTION = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")
NVTE_BY_BACKEND = {"local": "000", "flash": "100", "fused": "010", "unfused": "001", "auto": "111"}


def attention_backend_problems(cfg: DictConfig, environ: Mapping[str, str]) -> list[str]:
    """A Megatron attention_backend Megatron does not know, or an NVTE_*_ATTN variable it would refuse."""
    key = f"{A}.actor.megatron.override_transformer_config.attention_backend"
    backend = str((cfg[A].actor.megatron.get("override_transformer_config") or {}).get("attention_backend") or "auto")
    if backend not in NVTE_BY_BACKEND:
        return [f"{key}={backend}: expected one of {', '.join(NVTE_BY_BACKEND)}"]
    return [f"{var}={environ[var]} in the environment, but {key}={backend} needs {want} there (or nothing): "
            f"Megatron stops on it; unset it" for var, want in zip(NVTE_ATTENTION, NVTE_BY_BACKEND[backend])
            if environ.get(var) not in (None, want)]


def _model_config(path) -> dict:
    """The model's config.json; {} where there is none to read (plan without the model: the model check says so)."""
    try:
        return json.loads((Path(str(path or "")).expanduser() / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def logger_problems(cfg: DictConfig) -> list[str]:
    loggers = [cfg.trainer.logger] if isinstance(cfg.trainer.logger, str) else list(cfg.trainer.logger)
    return [f"trainer.logger includes {name} but {package} is not installed: pip install {package}, or drop it "
            f"from trainer.logger" for name in loggers
            if (package := LOGGER_PACKAGES.get(name)) and importlib.util.find_spec(package) is None]


def reward_function_problems(cfg: DictConfig) -> list[str]:
    fn = cfg.reward.custom_reward_function
    if not fn.path or not Path(str(fn.path)).is_file():
        return []  # unset, or missing: validate.missing_inputs says so
    probe = ("import importlib.util, sys\n"
             "spec = importlib.util.spec_from_file_location('ascend_rl_reward_probe', sys.argv[1])\n"
             "module = importlib.util.module_from_spec(spec)\n"
             "spec.loader.exec_module(module)\n"
             "print('\\nascend-rl: imported', callable(getattr(module, sys.argv[2], None)))\n")
    key = "reward.custom_reward_function"
    try:
        done = subprocess.run([sys.executable, "-c", probe, str(fn.path), fn.name], capture_output=True, text=True,
                              timeout=REWARD_IMPORT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return [f"{key}.path={fn.path}: importing it took over {REWARD_IMPORT_TIMEOUT_S} s"]
    verdict = next((line for line in done.stdout.splitlines() if line.startswith("ascend-rl: imported")), None)
    if done.returncode != 0 or verdict is None:  # raised, or exited while importing
        last = next((line for line in reversed(done.stderr.strip().splitlines()) if line.strip()),
                    f"SystemExit: {done.returncode}")
        return [f"{key}.path={fn.path}: importing it failed: {last.strip()}"]
    if verdict.endswith("False"):
        return [f"{key}.name={fn.name}: {fn.path} defines no function {fn.name!r}"]
    return []


def scorer_problems(cfg: DictConfig) -> list[str]:
    """Without a custom reward function, each data_source must have a built-in scorer."""
    if cfg.reward.custom_reward_function.path:
        return []
    sources = set()
    for files in (cfg.data.train_files, cfg.data.val_files):
        for file in data_files(files):
            sources |= _sources(file, cfg.data.reward_fn_key)
    return missing_scorers(sources)


def missing_scorers(sources: set[str]) -> list[str]:
    problems = []
    for source in sorted(sources):
        try:
            scorer_for(source)
        except KeyError as err:
            problems.append(str(err.args[0]))
    return problems


def _sources(file: str, column: str) -> set[str]:
    """The data_source values of a parquet file (that one column only); nothing when it is not readable (the
    data checks say why at start-up)."""
    import pyarrow.parquet as pq

    try:
        return {str(v) for v in pq.read_table(file, columns=[column]).column(column).to_pylist()}
    except Exception:  # noqa: BLE001 - missing file, other layout: reported by the data loader with the row
        return set()
