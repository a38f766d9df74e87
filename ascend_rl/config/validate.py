"""Semantic checks of a loaded config: each returns one-line messages naming the keys involved.

`validate(cfg, layout)` is what every command runs; `missing_inputs(cfg)` (model and data paths on disk)
is an error for `train` and a note for `plan`, which needs neither.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from ascend_rl.algorithms.registry import ADV_ESTIMATORS, KL_CONTROLLERS, KL_ESTIMATORS, LOSS_AGG_MODES, POLICY_LOSSES
from ascend_rl.config import schema, verl_names
from ascend_rl.config.features import critic_in_use
from ascend_rl.config.layout import Layout
from ascend_rl.reward.managers import REWARD_MANAGERS, check_reward_kwargs
from ascend_rl.stack import installed_version

A = "actor_rollout_ref"
TRUNCATION_MODES = ("error", "left", "right", "middle")
RESUME_MODES = ("auto", "disable", "resume_path")
LOGGERS = ("console", "tensorboard", "wandb")  # trainer.tracking has one sink for each
LAUNCH_MODES = ("engine", "server")
PROFILER_TOOLS = (None, "torch", "npu")
WEIGHT_TRANSPORTS = ("auto", "tensor", "disk", "distributed")


def validate(cfg: DictConfig, layout: Layout) -> list[str]:
    return [*_check_choices(cfg), *_check_numbers(cfg), *_check_ranges(cfg), *_check_batches(cfg, layout),
            *_check_rollout(cfg, layout), *_check_sequence_parallel(cfg), *_check_megatron(cfg),
            *_check_mixed_precision(cfg)]


def _check_numbers(cfg: DictConfig) -> list[str]:
    """NaN is never a setting (and passes every `<`/`>` range check silently, as comparisons with NaN are False)."""
    return [f"{path}=nan: not a number" for path in schema.leaf_paths(cfg)
            if isinstance(value := OmegaConf.select(cfg, path), float) and math.isnan(value) and not _derived(path)]


def _derived(path: str) -> bool:
    """A key whose default interpolates another (`${...}`): a NaN there is the other key's, reported once."""
    return schema.interpolates(schema.known_keys().get(path))


def _finite(v) -> bool:
    return v is None or math.isfinite(v)


def _choice(key: str, value, valid, verl_knows=()) -> list[str]:
    """An error for a value neither we nor verl know; one verl knows and we lack is lint.unsupported_features'."""
    if value in valid or value in verl_knows:
        return []
    return [f"{key}={value!r}: expected one of {', '.join(map(str, valid))}"]


def plain_map(node) -> dict:
    """A config map as a plain dict (empty when unset), safe to pickle to worker processes."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else {}


def _kl_kind_ok(kind: str) -> bool:
    return kind.removesuffix("+") in KL_ESTIMATORS


def _check_choices(cfg: DictConfig) -> list[str]:
    actor, alg = cfg[A].actor, cfg.algorithm
    errors = [
        *_choice("algorithm.adv_estimator", alg.adv_estimator, ADV_ESTIMATORS.names(), verl_names.ADV_ESTIMATORS),
        *_choice(f"{A}.actor.policy_loss.loss_mode", actor.policy_loss.loss_mode, POLICY_LOSSES.names(),
                 verl_names.POLICY_LOSSES),
        *_choice(f"{A}.actor.loss_agg_mode", actor.loss_agg_mode, LOSS_AGG_MODES),
        *_choice("algorithm.kl_ctrl.type", alg.kl_ctrl.type, KL_CONTROLLERS.names()),
        *_choice("data.truncation", cfg.data.truncation, TRUNCATION_MODES),
        *_choice("trainer.resume_mode", cfg.trainer.resume_mode, RESUME_MODES),
        *_choice(f"{A}.actor.strategy", actor.strategy, ("fsdp", "fsdp2", "megatron")),
        *_choice("global_profiler.tool", cfg.global_profiler.tool, PROFILER_TOOLS, verl_names.PROFILER_TOOLS),
        *_choice(f"{A}.rollout.launch.mode", cfg[A].rollout.launch.mode, LAUNCH_MODES),
        *_choice(f"{A}.rollout.launch.weight_transport", cfg[A].rollout.launch.weight_transport, WEIGHT_TRANSPORTS),
        *_choice("reward.reward_manager.name", cfg.reward.reward_manager.name, REWARD_MANAGERS.names(),
                 verl_names.REWARD_MANAGERS),
        *check_reward_kwargs(cfg.reward.reward_manager.name, plain_map(cfg.reward.get("reward_kwargs"))),
    ]
    for key, kind in ((f"{A}.actor.kl_loss_type", actor.kl_loss_type), ("algorithm.kl_penalty", alg.kl_penalty)):
        if not _kl_kind_ok(kind):
            errors.append(f"{key}={kind!r}: expected one of {', '.join(KL_ESTIMATORS.names())} (optionally with '+')")
    launch = cfg[A].rollout.launch
    if launch.weight_transport != "auto" and launch.mode == "engine" and not launch.url:
        errors.append(f"{A}.rollout.launch.weight_transport={launch.weight_transport} applies over HTTP "
                      f"(launch.mode=server or launch.url); an in-process engine takes the tensors directly")
    if cfg.trainer.resume_mode == "resume_path" and not cfg.trainer.resume_from_path:
        errors.append("trainer.resume_mode=resume_path needs trainer.resume_from_path")
    loggers = [cfg.trainer.logger] if isinstance(cfg.trainer.logger, str) else list(cfg.trainer.logger)
    errors += [f"trainer.logger: unknown logger {name!r}; expected some of {', '.join(LOGGERS)}"
               for name in loggers if name not in LOGGERS + verl_names.LOGGERS]
    if cfg[A].model.path in (None, ""):
        errors.append(f"{A}.model.path is not set: give a local Hugging Face model directory")
    return errors


def _check_ranges(cfg: DictConfig) -> list[str]:
    actor, ro = cfg[A].actor, cfg[A].rollout
    rules = [
        (f"{A}.actor.clip_ratio_low", actor.clip_ratio_low, lambda v: 0 <= v < 1, "in [0, 1)"),
        (f"{A}.actor.clip_ratio_high", actor.clip_ratio_high, lambda v: v >= 0, ">= 0"),
        (f"{A}.actor.clip_ratio_c", actor.clip_ratio_c, lambda v: v > 1, "> 1 (dual clip)"),
        (f"{A}.actor.optim.lr", actor.optim.lr, lambda v: 0 <= v < math.inf, ">= 0 and finite"),
        (f"{A}.actor.ppo_epochs", actor.ppo_epochs, lambda v: v >= 1, ">= 1"),
        (f"{A}.rollout.n", ro.n, lambda v: v >= 1, ">= 1"),
        # training computes log-probs of logits / temperature: 0 divides by zero (greedy is for validation)
        (f"{A}.rollout.temperature", ro.temperature, lambda v: 0 < v < math.inf, "> 0 and finite (greedy decoding, "
         "temperature 0, is for validation: rollout.val_kwargs.temperature)"),
        (f"{A}.rollout.val_kwargs.temperature", ro.val_kwargs.temperature, lambda v: 0 <= v < math.inf,
         ">= 0 and finite"),
        (f"{A}.rollout.top_p", ro.top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
        (f"{A}.rollout.val_kwargs.top_p", ro.val_kwargs.top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
        (f"{A}.rollout.top_k", ro.top_k, lambda v: v == -1 or v >= 1, "-1 (off) or >= 1"),
        (f"{A}.rollout.gpu_memory_utilization", ro.gpu_memory_utilization, lambda v: 0 < v <= 1, "in (0, 1]"),
        (f"{A}.rollout.max_num_seqs", ro.max_num_seqs, lambda v: v >= 1, ">= 1"),
        (f"{A}.actor.ppo_max_token_len_per_gpu", actor.ppo_max_token_len_per_gpu, lambda v: v >= 1, ">= 1"),
        (f"{A}.rollout.log_prob_max_token_len_per_gpu", ro.log_prob_max_token_len_per_gpu, lambda v: v >= 1, ">= 1"),
        (f"{A}.rollout.max_num_batched_tokens", ro.max_num_batched_tokens, lambda v: v >= 1, ">= 1"),
        (f"{A}.rollout.max_model_len", ro.max_model_len, lambda v: v is None or v >= 2, "null or >= 2"),
        ("data.max_prompt_length", cfg.data.max_prompt_length, lambda v: v >= 1, ">= 1"),
        ("data.max_response_length", cfg.data.max_response_length, lambda v: v >= 1, ">= 1"),
        ("data.train_batch_size", cfg.data.train_batch_size, lambda v: v >= 1, ">= 1"),
        (f"{A}.actor.ppo_mini_batch_size", actor.ppo_mini_batch_size, lambda v: v >= 1, ">= 1"),
        ("trainer.nnodes", cfg.trainer.nnodes, lambda v: v >= 1, ">= 1"),
        ("trainer.total_training_steps", cfg.trainer.total_training_steps, lambda v: v is None or v >= 1,
         "null (from trainer.total_epochs) or >= 1"),
        ("trainer.total_epochs", cfg.trainer.total_epochs, lambda v: v >= 1, ">= 1"),
        (f"{A}.actor.clip_ratio_c", actor.clip_ratio_c, _finite, "finite"),
        (f"{A}.actor.entropy_coeff", actor.entropy_coeff, _finite, "finite"),
        (f"{A}.actor.kl_loss_coef", actor.kl_loss_coef, _finite, "finite"),
        ("algorithm.kl_ctrl.kl_coef", cfg.algorithm.kl_ctrl.kl_coef, _finite, "finite"),
        ("trainer.n_gpus_per_node", cfg.trainer.n_gpus_per_node, lambda v: v >= 1, ">= 1"),
        ("algorithm.gamma", cfg.algorithm.gamma, lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("algorithm.lam", cfg.algorithm.lam, lambda v: 0 <= v <= 1, "in [0, 1]"),
    ]
    return [f"{key}={value} must be {what}" for key, value, ok, what in rules if not _holds(ok, value)]


def _holds(rule, value) -> bool:
    if isinstance(value, float) and math.isnan(value):
        return True  # _check_numbers reports it
    try:
        return bool(rule(value))
    except TypeError:  # a string where a number belongs (keys whose default is null have no type to check)
        return False


def _check_batches(cfg: DictConfig, layout: Layout) -> list[str]:
    errors = []
    actor, train, batch = cfg[A].actor, layout.train, layout.batch
    world = layout.world_size
    if actor.ppo_mini_batch_size > cfg.data.train_batch_size:
        errors.append(f"{A}.actor.ppo_mini_batch_size={actor.ppo_mini_batch_size} is larger than "
                      f"data.train_batch_size={cfg.data.train_batch_size}")
    if train.strategy == "megatron":
        model_parallel = train.tp * train.pp * train.cp
        if world % model_parallel:
            errors.append(f"{world} training devices do not divide into Megatron TP·PP·CP = {model_parallel}")
        unit = train.data_parallel * (actor.ppo_micro_batch_size_per_gpu or 1)
        what = f"Megatron DP {train.data_parallel} × {A}.actor.ppo_micro_batch_size_per_gpu"
    else:
        if world % train.ulysses_sp:
            errors.append(f"{world} training devices do not divide into {A}.actor.ulysses_sequence_parallel_size="
                          f"{train.ulysses_sp}")
        unit, what = world, f"{world} training devices (trainer.nnodes × trainer.n_gpus_per_node)"
    if batch.samples_per_step % unit:
        errors.append(f"data.train_batch_size × rollout.n = {batch.samples_per_step} samples per step do not "
                      f"divide over {what} = {unit}")
    if batch.samples_per_mini_batch % train.data_parallel:
        errors.append(f"{A}.actor.ppo_mini_batch_size × rollout.n = {batch.samples_per_mini_batch} samples do not "
                      f"divide over {train.data_parallel} data-parallel ranks")
    micro = None if actor.use_dynamic_bsz else actor.ppo_micro_batch_size_per_gpu  # tokens decide instead
    per_rank = batch.samples_per_rank_per_mini_batch
    if micro is not None and micro < 1:
        errors.append(f"{A}.actor.ppo_micro_batch_size_per_gpu={micro} must be >= 1")
    elif micro is not None and per_rank and micro <= per_rank and per_rank % micro:
        errors.append(f"{A}.actor.ppo_micro_batch_size_per_gpu={micro} does not divide the {per_rank} samples "
                      f"each rank gets per mini-batch")
    return errors


MEGATRON_LAYOUT = ("tensor_model_parallel_size", "expert_model_parallel_size", "expert_tensor_parallel_size",
                   "pipeline_model_parallel_size", "context_parallel_size")


def _check_megatron(cfg: DictConfig) -> list[str]:
    """The reference policy and the critic live in the actor's workers, the critic in the actor's kind of
    engine; a Megatron one on the actor's layout (Megatron's process groups are one per process; verl's recipes
    set them the same); experts split over EP; experts' TP (ETP) defaults to TP."""
    critic = cfg.critic if critic_in_use(cfg) else None
    actor_megatron = cfg[A].actor.strategy == "megatron"
    if critic is not None and actor_megatron != (critic.strategy == "megatron"):
        return [f"critic.strategy={critic.strategy} with {A}.actor.strategy={cfg[A].actor.strategy}: the critic "
                f"runs in the actor's workers, in the same kind of engine (model_engine sets both)"]
    if not actor_megatron or "megatron" not in cfg[A].actor:
        return []
    actor = cfg[A].actor.megatron
    others = {f"{A}.ref.megatron": cfg[A].ref.get("megatron") or {},
              "critic.megatron": critic.megatron if critic is not None else {}}
    errors = [f"{name}.{key}={other[key]} differs from {A}.actor.megatron.{key}={actor[key]}: it runs on the "
              f"actor's layout" for name, other in others.items() for key in MEGATRON_LAYOUT
              if key in other and other[key] != actor[key]
              and not (key == "expert_tensor_parallel_size" and other[key] is None)]
    if critic is not None and _attention_backend(critic.megatron) != _attention_backend(actor):
        errors.append(f"critic.megatron.override_transformer_config.attention_backend="
                      f"{_attention_backend(critic.megatron)} differs from the actor's "
                      f"({_attention_backend(actor)}): Megatron sets its backend's NVTE_* variables for the whole "
                      f"process, and the critic shares the actor's")
    tp, etp = actor.tensor_model_parallel_size, actor.expert_tensor_parallel_size
    if etp is not None and etp not in (tp, 1):
        errors.append(f"{A}.actor.megatron.expert_tensor_parallel_size={etp}: expected 1 or the tensor-parallel "
                      f"size ({tp})")
    return errors


def _attention_backend(megatron: DictConfig):
    return (megatron.get("override_transformer_config") or {}).get("attention_backend")


MIXED_PRECISION_FIELDS = ("param_dtype", "reduce_dtype", "buffer_dtype")  # what verl's FSDP engine reads
FSDP_SECTIONS = (f"{A}.actor.fsdp_config", f"{A}.ref.fsdp_config", "critic.fsdp")


def _check_mixed_precision(cfg: DictConfig) -> list[str]:
    """`+…fsdp_config.mixed_precision.*` (verl's FSDP engine reads param_dtype, reduce_dtype, buffer_dtype): the
    fields it knows; buffers stay in the model's dtype here (FSDP2 casts parameters only), so buffer_dtype
    may only say fp32, verl's default."""
    errors = []
    for path in FSDP_SECTIONS:
        mixed = OmegaConf.select(cfg, f"{path}.mixed_precision")
        if mixed is None:
            continue
        if not isinstance(mixed, DictConfig):
            errors.append(f"{path}.mixed_precision={mixed}: expected a map of {', '.join(MIXED_PRECISION_FIELDS)}")
            continue
        errors += [f"{path}.mixed_precision.{field}: unknown field (verl's FSDP engine reads "
                   f"{', '.join(MIXED_PRECISION_FIELDS)})" for field in mixed if field not in MIXED_PRECISION_FIELDS]
        if mixed.get("buffer_dtype") not in (None, "fp32", "float32"):
            errors.append(f"{path}.mixed_precision.buffer_dtype={mixed.buffer_dtype}: buffers other than fp32 are "
                          f"not built (FSDP2 casts parameters, not buffers); leave it out or set fp32")
    return errors


def _check_sequence_parallel(cfg: DictConfig) -> list[str]:
    """Ulysses runs on packed sequences (verl asserts the same); the reference policy and the critic live in the
    actor's workers and split sequences as it does; an engine config's own SP size must agree with its section's."""
    arr, critic, errors = cfg[A], cfg.critic, []
    sp = arr.actor.get("ulysses_sequence_parallel_size", 1)
    packed = {f"{A}.actor": arr.actor.get("use_remove_padding", arr.model.use_remove_padding),
              f"{A}.ref": arr.model.use_remove_padding, "critic": critic.model.get("use_remove_padding")}
    sections = {f"{A}.actor": (arr.actor, "fsdp_config"), f"{A}.ref": (arr.ref, "fsdp_config"),
                "critic": (critic, "fsdp")}
    if not critic_in_use(cfg):
        del sections["critic"]
    for name, (section, engine) in sections.items():
        size = section.get("ulysses_sequence_parallel_size", 1)
        engine_size = (section.get(engine) or {}).get("ulysses_sequence_parallel_size", 1)
        if engine_size not in (1, size):
            errors.append(f"{name}.{engine}.ulysses_sequence_parallel_size={engine_size} disagrees with "
                          f"{name}.ulysses_sequence_parallel_size={size}; set them equal")
        if size != sp:
            errors.append(f"{name}.ulysses_sequence_parallel_size={size} must equal {A}.actor's ({sp}): it runs in "
                          f"the actor's workers")
        if size > 1 and not packed[name]:
            where = "critic.model" if name == "critic" else f"{A}.model"
            errors.append(f"{name}.ulysses_sequence_parallel_size={size} needs packed sequences: set "
                          f"{where}.use_remove_padding=True")
    return errors


def _check_rollout(cfg: DictConfig, layout: Layout) -> list[str]:
    ro, errors = layout.rollout, []
    if layout.world_size % ro.devices_per_replica:
        errors.append(f"{layout.world_size} devices do not divide into rollout replicas of {ro.devices_per_replica} "
                      f"({A}.rollout.tensor_model_parallel_size={ro.tp} × data_parallel_size={ro.dp} × "
                      f"pipeline_model_parallel_size={ro.pp}; devices: trainer.nnodes × trainer.n_gpus_per_node); "
                      f"set {A}.rollout.tensor_model_parallel_size to a divisor of {layout.world_size}")
    if ro.ep > 1 and ro.ep != ro.tp * ro.dp:
        errors.append(f"{A}.rollout.expert_parallel_size={ro.ep} must equal tensor_model_parallel_size × "
                      f"data_parallel_size = {ro.tp * ro.dp}")
    return errors


def data_files(value) -> list[str]:
    """One path or a list of them, `~` expanded (verl's default paths start with it)."""
    if value is None:
        return []
    values = value if isinstance(value, (list, ListConfig)) else [value]
    return [str(Path(str(v)).expanduser()) for v in values]


def missing_inputs(cfg: DictConfig) -> list[str]:
    """Inputs that must exist on disk before training."""
    out = []
    model = cfg[A].model.path
    if model and not Path(model).is_dir():
        out.append(f"{A}.model.path={model}: no such directory (models are not downloaded; pass a local "
                   f"Hugging Face model directory)")
    for key in ("data.train_files", "data.val_files"):
        files = data_files(OmegaConf.select(cfg, key))
        if key == "data.train_files" and not files:
            out.append("data.train_files is not set")
        out += [f"{key}: {f}: no such file" for f in files if not Path(f).is_file()]
    rollout = cfg[A].rollout
    if rollout.name == "sglang" and not rollout.launch.url and installed_version("sglang") is None:
        out.append(f"{A}.rollout.name=sglang: SGLang is not installed here (install it as DEVELOPERS.md "
                   f"says for GPUs and Ascend NPUs), or attach to a running server with "
                   f"{A}.rollout.launch.url=http://host:port, or use {A}.rollout.name=native")
    out += _missing_optimizer(cfg[A].actor.optim)
    reward_file = cfg.reward.custom_reward_function.path
    if reward_file and not Path(reward_file).is_file():
        out.append(f"reward.custom_reward_function.path={reward_file}: no such file")
    return out


def _missing_optimizer(optim: DictConfig) -> list[str]:
    """verl imports `optimizer_impl` and takes `optimizer` from it when the workers start; say so before."""
    key, impl, name = f"{A}.actor.optim", optim.get("optimizer_impl"), optim.get("optimizer")
    if impl is None or name is None:  # another engine's tree (Megatron names its optimizer differently)
        return []
    try:
        module = importlib.import_module(impl)
    except ImportError as err:
        return [f"{key}.optimizer_impl={impl}: cannot import it here ({err})"]
    if not callable(getattr(module, name, None)):
        return [f"{key}.optimizer={name}: {impl} has no such optimizer"]
    return []
