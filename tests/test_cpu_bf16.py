"""bf16 compute on the CPU: detection of the CPU's bf16 units and the fp32 fallback, the actor computing in
bf16 over fp32 master weights, and the native engine in rollout.dtype."""

import logging

import pytest
import torch
from omegaconf import OmegaConf
from test_distributed import fixed_batch

from ascend_rl import platform
from ascend_rl.workers.actor import Actor, ActorSettings
from ascend_rl.workers.fsdp import FsdpSettings, fsdp_settings
from ascend_rl.workers.optimizer import OptimSettings

BF16 = FsdpSettings(compute_dtype=torch.bfloat16)
# bf16 keeps 8 significant bits: a logit in [2, 4) is rounded by up to 1/64, and the log-prob is a logit minus
# the log-sum-exp of logits of that size. On the tiny model the gap measured 0.005 at most, 0.001 on average.
LOGPROB_MAX_GAP, LOGPROB_MEAN_GAP = 1 / 32, 5e-3


@pytest.fixture()
def with_bf16_units(monkeypatch):
    monkeypatch.setattr(platform, "cpu_units", lambda dtype: ["amx_bf16"])


@pytest.fixture()
def without_bf16_units(monkeypatch):
    monkeypatch.setattr(platform, "cpu_units", lambda dtype: [])
    monkeypatch.setattr(platform, "_fallbacks_logged", set())


def test_bf16_units_come_from_torch_cpuinfo_or_proc_cpuinfo():
    x86 = {"amx_bf16": True, "avx512_bf16": True, "amx_fp16": False, "avx512_fp16": True}
    assert platform.cpu_units("bfloat16", x86, "") == ["amx_bf16", "avx512_bf16"]
    assert platform.cpu_units("float16", x86, "") == ["avx512_fp16"]
    assert platform.cpu_units("bfloat16", {}, "fp asimd evtstrm bf16 i8mm") == ["bf16"]  # Arm's Features line
    assert platform.cpu_units("bfloat16", {"avx512_f": True}, "fpu avx512f avx2") == []


def test_without_bf16_units_the_cpu_computes_in_fp32_and_says_so_once(without_bf16_units, caplog):
    key = "actor_rollout_ref.actor.fsdp_config.dtype"
    with caplog.at_level(logging.WARNING, logger="ascend_rl.platform"):
        assert platform.compute_dtype("cpu", torch.bfloat16, key) == torch.float32
        assert platform.compute_dtype("cpu", torch.bfloat16, key) == torch.float32
    assert [r.getMessage() for r in caplog.records] == [
        f"{key}=bfloat16: this CPU has no bfloat16 matmul units (amx_bf16 / avx512_bf16 / bf16), computing in float32"]
    assert platform.compute_dtype("cuda", torch.bfloat16, key) == torch.bfloat16  # accelerators: as asked
    assert platform.compute_dtype("cpu", torch.float32, key) == torch.float32


def test_fsdp_settings_honour_mixed_precision_then_dtype_on_cpu(with_bf16_units):
    cfg = OmegaConf.create({"model_dtype": "fp32", "dtype": "float32", "param_offload": False,
                            "reshard_after_forward": True})
    assert fsdp_settings(cfg, "cpu").compute_dtype == torch.float32
    assert fsdp_settings(OmegaConf.merge(cfg, {"dtype": "bfloat16"}), "cpu").compute_dtype == torch.bfloat16
    mixed = OmegaConf.merge(cfg, {"mixed_precision": {"param_dtype": "bf16", "reduce_dtype": "fp32"}})
    settings = fsdp_settings(mixed, "cpu")  # verl's FSDP engine reads mixed_precision.param_dtype first
    assert (settings.model_dtype, settings.compute_dtype, settings.reduce_dtype) == (torch.float32, torch.bfloat16,
                                                                                    torch.float32)


def test_fsdp_settings_fall_back_to_fp32_without_units(without_bf16_units):
    cfg = OmegaConf.create({"model_dtype": "fp32", "dtype": "bfloat16", "param_offload": False,
                            "reshard_after_forward": True})
    assert fsdp_settings(cfg, "cpu").compute_dtype == torch.float32
    assert fsdp_settings(cfg, "npu").compute_dtype == torch.bfloat16


@pytest.fixture(scope="module")
def actors(tiny_model_dir):
    settings = ActorSettings(ppo_mini_batch_size=32, ppo_micro_batch_size_per_gpu=16)
    optim = OptimSettings(lr=3e-3, total_steps=10)
    return (Actor(str(tiny_model_dir), "cpu", settings, optim),
            Actor(str(tiny_model_dir), "cpu", settings, optim, fsdp=BF16))


def test_bf16_log_probs_are_close_to_fp32(actors):
    exact, bf16 = actors
    batch = fixed_batch(exact, n=32)
    assert bf16.model.config._attn_implementation == "ascend_rl_cpu"  # short rows: matmul attention
    assert exact.model.config._attn_implementation == "sdpa"
    low, entropy = bf16.log_probs(batch)
    mask = batch["response_mask"].bool()
    gap = (low - batch["old_log_probs"]).abs()[mask]
    assert low.dtype == entropy.dtype == torch.float32  # log-softmax and entropy in fp32 from bf16 logits
    assert 0 < gap.max() < LOGPROB_MAX_GAP and gap.mean() < LOGPROB_MEAN_GAP


def test_bf16_updates_keep_fp32_master_weights_and_optimizer_state_and_learn(actors):
    _, bf16 = actors
    batch = fixed_batch(bf16, n=32)
    mask = batch["response_mask"]
    batch["advantages"] = mask.clone()  # every sampled token good: its log-prob must rise
    before = (bf16.log_probs(batch)[0] * mask).sum() / mask.sum()
    for _ in range(5):
        batch["old_log_probs"] = bf16.log_probs(batch)[0]
        metrics = bf16.update(batch)
    after = (bf16.log_probs(batch)[0] * mask).sum() / mask.sum()
    assert after > before + 0.05, (before, after)
    assert torch.isfinite(torch.tensor(metrics["actor/pg_loss"]))
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    states = [s for s in bf16.optimizer.state.values() if s]
    assert states and all(t.dtype == torch.float32 for s in states for k, t in s.items() if k != "step")


def test_the_native_engine_runs_in_rollout_dtype_with_the_lean_decoder(tiny_model_dir, actors,
                                                                         with_bf16_units):
    from ascend_rl.config import load_config
    from ascend_rl.data.collate import collate
    from ascend_rl.rollout.factory import native_engine_kwargs
    from ascend_rl.rollout.native import NativeEngine
    from ascend_rl.rollout.protocol import SamplingParams
    from ascend_rl.rollout.steppers import LeanStepper

    cfg = load_config([f"actor_rollout_ref.model.path={tiny_model_dir}", "trainer.device=cpu"])
    assert cfg.actor_rollout_ref.rollout.dtype == "bfloat16"  # verl's default
    kwargs = native_engine_kwargs(cfg, "cpu")
    assert kwargs["dtype"] == torch.bfloat16
    engine = NativeEngine.from_pretrained(str(tiny_model_dir), "cpu", dtype=kwargs["dtype"])
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    assert isinstance(engine.stepper, LeanStepper)  # its self-check passes at bf16's tolerance
    prompts = [[5, 6, 7, 8], [9, 10]]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=6, n=4, sampling_seed=3, ignore_eos=True))
    exact = actors[0]  # the other one has been updated by now
    bf16 = Actor(str(tiny_model_dir), "cpu", exact.settings, OptimSettings(lr=0.0, total_steps=1), fsdp=BF16)
    batch = collate([p for p in prompts for _ in range(4)], [o.output_ids for o in outs], pad_token_id=0)
    mask = batch["response_mask"].bool()
    engine_lp = torch.tensor([o.output_logprobs for o in outs])
    for actor, bound in ((bf16, 2 * LOGPROB_MAX_GAP), (exact, 2 * LOGPROB_MAX_GAP)):
        gap = (actor.log_probs(batch)[0] - engine_lp).abs()[mask]
        assert gap.max() < bound, (actor, gap.max())


def test_without_units_the_engine_is_built_in_fp32(tiny_model_dir, without_bf16_units):
    from ascend_rl.config import load_config
    from ascend_rl.rollout.factory import native_engine_kwargs

    cfg = load_config([f"actor_rollout_ref.model.path={tiny_model_dir}", "trainer.device=cpu"])
    assert native_engine_kwargs(cfg, "cpu")["dtype"] == torch.float32


def test_verls_mixed_precision_map_sets_the_compute_dtype_and_refuses_what_it_lacks(with_bf16_units, capsys):
    """`+…fsdp_config.mixed_precision.*` as verl users pass it (verl's FSDP engine reads a dict there)."""
    from ascend_rl.cli.main import main
    from ascend_rl.config import load_config

    mixed = "+actor_rollout_ref.actor.fsdp_config.mixed_precision"
    cfg = load_config([f"{mixed}.param_dtype=bf16", f"{mixed}.reduce_dtype=fp32", f"{mixed}.buffer_dtype=fp32"])
    settings = fsdp_settings(cfg.actor_rollout_ref.actor.fsdp_config, "cpu")
    assert (settings.compute_dtype, settings.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert main(["plan", f"{mixed}.cast_forward_inputs=true", "+critic.fsdp.mixed_precision.buffer_dtype=bf16"]) == 1
    err = capsys.readouterr().out  # plan lists every start-up problem
    assert "fsdp_config.mixed_precision.cast_forward_inputs: unknown field (verl's FSDP engine reads param_dtype" in err
    assert "critic.fsdp.mixed_precision.buffer_dtype=bf16: buffers other than fp32 are not built" in err
