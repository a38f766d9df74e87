"""The CUDA paths (`pytest -m cuda`; skipped where torch.cuda.is_available() is False): a one-rank FSDP2 actor on
nccl computing in bf16 over fp32 master weights, CPU offload, the native engine inside that actor's worker, the
engine's log-probs against the trainer's (fp32 and bf16), releasing and resuming the engine's memory, the torch
profiler's trace, and checkpoints of CUDA tensors that resume to the same next step. scripts/device_check.sh runs
them on a GPU machine and reads the measured differences from the JUnit properties (`record_property`).

ASCEND_RL_CUDA_TESTS_ON_CPU=1 runs the same tests on the CPU (device cpu, gloo in place of nccl), so that their
logic is checked where no GPU is:

    ASCEND_RL_CUDA_TESTS_ON_CPU=1 .venv/bin/pytest -m cuda tests/test_cuda.py

Only what a CPU cannot show is skipped then: torch.cuda.memory_allocated, CUDA kernels in the trace, and CPU
offload (FSDP2 pins host memory, which needs an accelerator).
"""

import gc
import math
import os

import pytest
import torch
import torch.distributed as dist
from test_distributed import fixed_batch

from ascend_rl.distributed.actor_group import ActorGroup, _ActorWorker
from ascend_rl.distributed.worker_group import ProcessWorkerGroup
from ascend_rl.workers.actor import Actor, ActorSettings, ActorSpec
from ascend_rl.workers.fsdp import FsdpSettings
from ascend_rl.workers.optimizer import OptimSettings

ON_CPU = os.environ.get("ASCEND_RL_CUDA_TESTS_ON_CPU") == "1"
DEVICE = "cpu" if ON_CPU else "cuda"
A = "actor_rollout_ref"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not ON_CPU and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU (torch.cuda.is_available() is False); "
                              "ASCEND_RL_CUDA_TESTS_ON_CPU=1 runs their logic on the CPU"),
]

SETTINGS = dict(ppo_mini_batch_size=8, ppo_micro_batch_size_per_gpu=2, ppo_epochs=2, shuffle=True,
                loss_agg_mode="token-mean", use_kl_loss=False, entropy_coeff=0.01, grad_clip=1.0, balance_batch=False)
PROMPTS = [[1, 21, 15, 22, 33, 2, 99, 1], [1, 25, 26, 15, 27, 33, 2, 99, 1, 69], [7, 8, 9]]
# verl's defaults on a GPU: the actor and reference in bf16 autocast over fp32 weights, the engine in bf16 (said
# here: tests/helpers.py's tiny config computes in fp32)
BF16 = (f"{A}.actor.fsdp_config.dtype=bfloat16", f"{A}.ref.fsdp_config.dtype=bfloat16", f"{A}.rollout.dtype=bfloat16")


def actor_settings(**changes) -> ActorSettings:
    return ActorSettings(**{**SETTINGS, **changes})


def optim() -> OptimSettings:
    return OptimSettings(lr=1e-2, total_steps=4)


def on_host(named) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu", copy=True) for name, t in named}


def mean_distance(a: dict, b: dict) -> float:
    return sum((a[n] - b[n]).abs().sum().item() for n in a) / sum(t.numel() for t in a.values())


# --- a one-rank FSDP2 actor in a worker process, as trainer.n_gpus_per_node workers run it ----------------------

class ProbedActorWorker(_ActorWorker):
    """The actor's worker (device selection, device mesh, FSDP2, engine) with a look inside it."""

    def __init__(self, rank, world_size, **kwargs):
        super().__init__(rank, world_size, **kwargs)
        self.rank, self.world_size, self.kwargs = rank, world_size, kwargs

    def restart(self, path=None, state=None):
        """A fresh actor from the model directory, loaded from `path`'s shards when given (a resume)."""
        from torch.distributed.device_mesh import init_device_mesh

        spec = self.kwargs["spec"]
        mesh = init_device_mesh(torch.device(self.device).type, (self.world_size,))
        self.actor = Actor(spec.model_path, self.device, spec.settings, spec.optim, spec.gradient_checkpointing,
                           mesh=mesh, fsdp=spec.fsdp)
        if path is not None:
            self.actor.load_state(path, state)

    def save_shards(self, path):
        """The torch.distributed.checkpoint half of `TrainedModel.save` (its HF half fails for one rank: see
        test_one_rank_fsdp2_save_writes_the_hf_weights)."""
        import torch.distributed.checkpoint as dcp

        from ascend_rl.workers.trained import DCP_DIR

        dcp.save(self.actor._sharded_state(), checkpoint_id=path / DCP_DIR)

    def layout(self) -> dict:
        """Where and in which dtype the parameters and the optimizer state live, and the group's backends."""
        params = list(self.actor.model.parameters())
        state = [t for s in self.actor.optimizer.state.values() for t in s.values()
                 if torch.is_tensor(t) and t.dim() > 0]  # Adam's step counter is a 0-d tensor on the host
        local = [t.to_local() if hasattr(t, "to_local") else t for t in params + state]
        return {"dtensors": all(hasattr(p, "to_local") for p in params),
                "dtypes": sorted({str(p.dtype) for p in params}),
                "devices": sorted({t.device.type for t in local[:len(params)]}),
                "optimizer_devices": sorted({t.device.type for t in local[len(params):]}),
                "backend": dist.get_backend_config()}

    def compute(self, batch) -> tuple[str, str]:
        """The dtype and device of a linear layer's output in the actor's forward."""
        from ascend_rl.workers.fsdp import decoder_layers

        seen = []
        hook = decoder_layers(self.actor.model)[0].self_attn.q_proj.register_forward_hook(
            lambda module, args, out: seen.append((str(out.dtype), out.device.type)))
        try:
            self.actor.log_probs(batch)
        finally:
            hook.remove()
        return seen[0]

    def all_reduce(self) -> torch.Tensor:
        t = torch.full((4,), float(self.rank + 1), device=self.device)
        dist.all_reduce(t)
        return t.cpu()


def probed_group():
    """ActorGroup's make_group with the probed worker; the device's group backend (cpu:gloo,cuda:nccl on a GPU)."""
    from ascend_rl.platform import get_platform

    backend = get_platform(DEVICE).process_group_backend
    return lambda factory, kwargs: ProcessWorkerGroup(1, "test_cuda:ProbedActorWorker", kwargs, backend=backend)


def rollout_spec():
    """A native fp32 engine in the worker, as trainer.n_gpus_per_node > 1 places one on every device."""
    from ascend_rl.distributed.colocated import WorkerRolloutSpec

    return WorkerRolloutSpec("native", devices_per_replica=1, bucket_megabytes=0, native={"dtype": torch.float32})


@pytest.fixture(scope="module")
def bf16_group(tiny_model_dir):
    """One worker: the actor sharded by FSDP2 (bf16 compute, fp32 master weights) and a native fp32 engine."""
    group = ActorGroup(probed_group(), DEVICE, ActorSpec(str(tiny_model_dir), actor_settings(), optim(),
                                                         fsdp=FsdpSettings(compute_dtype=torch.bfloat16)),
                       rollout=rollout_spec())
    yield group
    group.close()


@pytest.mark.timeout(300)
def test_one_rank_fsdp2_on_nccl_computes_in_bf16_over_fp32_master_weights(tiny_model_dir, bf16_group,
                                                                          record_property):
    group = bf16_group
    group.group.call_all("restart")  # fresh weights, whatever ran before
    exact = Actor(str(tiny_model_dir), DEVICE, actor_settings(), optim())  # fp32, one process, no FSDP
    batch = fixed_batch(exact)
    layout = group.group.call_all("layout")[0]
    assert layout["dtensors"] and layout["dtypes"] == ["torch.float32"] and layout["devices"] == [DEVICE]
    assert ("gloo" if ON_CPU else "cuda:nccl") in layout["backend"]
    assert torch.equal(group.group.call_all("all_reduce")[0], torch.ones(4))
    assert group.group.call_all("compute", batch[:2])[0] == ("torch.bfloat16", DEVICE)

    initial = on_host(exact.named_weights())
    reference = exact.update(batch)
    updated = on_host(exact.named_weights())
    low = group.log_probs(batch)[0]
    diff = (low - batch["old_log_probs"]).abs().max().item()
    record_property("fsdp_bf16_vs_fp32_logprob_diff_max", diff)
    assert low.dtype == torch.float32 and 0 < diff < 0.1  # bf16 shows, and stays small

    metrics = group.update(batch)
    assert math.isfinite(metrics["actor/pg_loss"]) and math.isfinite(metrics["actor/grad_norm"])
    assert metrics["actor/pg_loss"] == pytest.approx(reference["actor/pg_loss"], abs=2e-2)
    weights = dict(group.named_weights())
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert sum(not torch.equal(weights[n], initial[n]) for n in initial) == len(initial)  # every tensor moved
    # Adam moves each weight by ~lr whatever its gradient's size, so where bf16 flips the sign of a tiny gradient
    # it moves the other way; on average it lands far closer to the fp32 update than it moved (test_distributed).
    assert mean_distance(weights, updated) < 0.25 * mean_distance(initial, updated)
    after = group.group.call_all("layout")[0]
    assert after["dtypes"] == ["torch.float32"] and after["optimizer_devices"] == [DEVICE]


@pytest.mark.timeout(300)
def test_the_engine_in_the_worker_follows_the_fsdp2_actor(tiny_model_dir, bf16_group):
    """The weight sync gathers the shards on the device and pushes them into the worker's engine; it then
    generates what an engine in this process given those weights generates."""
    from ascend_rl.distributed.colocated import WorkerEngines
    from ascend_rl.rollout.native import NativeEngine
    from ascend_rl.rollout.protocol import SamplingParams

    group = bf16_group
    group.update(fixed_batch(Actor(str(tiny_model_dir), DEVICE, actor_settings(), optim()), seed=1))
    stats = group.sync_rollout_weights()
    weights = dict(group.named_weights())
    assert stats.tensors == len(weights) and stats.bytes == sum(t.numel() * 4 for t in weights.values())
    one = NativeEngine.from_pretrained(str(tiny_model_dir), DEVICE, dtype=torch.float32)
    one.update_weights_from_tensor(weights.items())
    engines = WorkerEngines(group.group, rollout_spec())
    params = [SamplingParams(max_new_tokens=6, n=2, sampling_seed=10 * i, ignore_eos=True) for i in range(3)]
    theirs, mine = engines.generate(PROMPTS, params, return_logprob=True), one.generate(PROMPTS, params,
                                                                                       return_logprob=True)
    assert [o.output_ids for o in theirs] == [o.output_ids for o in mine]
    assert torch.allclose(torch.tensor([o.output_logprobs for o in theirs]),
                          torch.tensor([o.output_logprobs for o in mine]), atol=1e-5)


@pytest.mark.timeout(300)
def test_sharded_checkpoint_of_device_dtensors_resumes_to_the_same_next_update(tiny_model_dir, bf16_group,
                                                                               tmp_path, record_property):
    group = bf16_group
    group.group.call_all("restart")
    source = Actor(str(tiny_model_dir), DEVICE, actor_settings(), optim())
    first, second = fixed_batch(source, seed=2), fixed_batch(source, seed=3)
    group.update(first)
    group.group.call_all("save_shards", tmp_path)
    state = group.state_dict()
    assert (tmp_path / "dcp" / ".metadata").is_file() and list((tmp_path / "dcp").glob("*.distcp"))
    straight = group.update(second)
    straight_weights = dict(group.named_weights())

    group.group.call_all("restart", tmp_path, state)  # a fresh actor resumed from the shards
    layout = group.group.call_all("layout")[0]
    assert layout["devices"] == [DEVICE] and layout["optimizer_devices"] == [DEVICE]
    resumed = group.update(second)
    resumed_weights = dict(group.named_weights())
    # Same process and kernels, but on a GPU attention's backward sums in a varying order (SDPA's memory-efficient
    # kernel), so "the same" is up to that noise: Adam turns it into ~lr only where a gradient is ~0, a few weights.
    # A lost optimizer state or schedule moves nearly every weight by ~lr (Adam's first step is ±lr).
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/lr"):
        assert resumed[key] == pytest.approx(straight[key], rel=1e-3, abs=1e-6), key
    assert_same_weights(straight_weights, resumed_weights, lr=optim().lr, record_property=record_property)


def assert_same_weights(a: dict, b: dict, lr: float, record_property) -> None:
    """Equal weights up to the noise of a device's unordered sums: their mean difference far below lr."""
    diff = [(a[n] - b[n]).abs() for n in a]
    mean = sum(d.sum().item() for d in diff) / sum(d.numel() for d in diff)
    record_property("resumed_weights_diff_mean", mean)
    record_property("resumed_weights_diff_max", max(d.max().item() for d in diff))
    if ON_CPU:  # a CPU sums in a fixed order: bit for bit
        assert mean == 0
    assert mean < lr / 100, mean


@pytest.mark.timeout(300)
def test_one_rank_fsdp2_save_writes_the_hf_weights(bf16_group, tmp_path):
    from safetensors.torch import load_file

    bf16_group.save(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    weights = dict(bf16_group.named_weights())
    assert all(torch.equal(saved[n], weights[n]) for n in saved)


@pytest.mark.timeout(300)
def test_cpu_offload_keeps_the_shards_on_the_host_and_makes_the_device_update(tiny_model_dir):
    if ON_CPU:
        pytest.skip("CPU offload moves parameters from an accelerator to pinned host memory: a CPU has neither")
    exact = Actor(str(tiny_model_dir), DEVICE, actor_settings(), optim())
    batch = fixed_batch(exact)
    group = ActorGroup(probed_group(), DEVICE, ActorSpec(str(tiny_model_dir), actor_settings(), optim(),
                                                         fsdp=FsdpSettings(offload=True)))
    try:
        layout = group.group.call_all("layout")[0]
        assert layout["dtensors"] and layout["devices"] == ["cpu"] and layout["dtypes"] == ["torch.float32"]
        assert group.group.call_all("compute", batch[:2])[0] == ("torch.float32", DEVICE)  # computes on the GPU
        log_probs = group.log_probs(batch)[0]
        assert (log_probs - batch["old_log_probs"]).abs().max() < 1e-5
        theirs, mine = group.update(batch), exact.update(batch)
        assert theirs["actor/pg_loss"] == pytest.approx(mine["actor/pg_loss"], abs=1e-5)
        assert theirs["actor/grad_norm"] == pytest.approx(mine["actor/grad_norm"], rel=1e-4)
        weights = dict(group.named_weights())
        for name, tensor in on_host(exact.named_weights()).items():  # the optimizer stepped on the host
            assert torch.allclose(weights[name], tensor, atol=3e-5), name
        assert group.group.call_all("layout")[0]["optimizer_devices"] == ["cpu"]
    finally:
        group.close()


# --- the native engine on the device ---------------------------------------------------------------------------

def engine_and_trainer(model_dir, dtype, temperature, trainer_dtype):
    """The engine's log-probs of its own samples (12 tokens, eos ignored: no padding in the responses) and the
    trainer's for the same batch (an Actor computing in `trainer_dtype` over fp32 weights)."""
    from ascend_rl.data.collate import collate
    from ascend_rl.rollout.native import NativeEngine
    from ascend_rl.rollout.protocol import SamplingParams

    engine = NativeEngine.from_pretrained(str(model_dir), DEVICE, dtype=dtype)
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=12, n=4, temperature=temperature, sampling_seed=3,
                                                   ignore_eos=True), return_logprob=True)
    batch = collate([p for p in PROMPTS for _ in range(4)], [o.output_ids for o in outs], pad_token_id=0)
    actor = Actor(str(model_dir), DEVICE, actor_settings(temperature=temperature), optim(),
                  fsdp=FsdpSettings(compute_dtype=trainer_dtype))
    return torch.tensor([o.output_logprobs for o in outs]), actor.log_probs(batch)[0], batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_lean_decoder_serves_the_engine(tiny_model_dir, dtype):
    """The engine's fast path passes its self-check against the model's own forward (else it falls back to
    transformers' forward, one batch at a time)."""
    from ascend_rl.rollout.native import NativeEngine
    from ascend_rl.rollout.steppers import LeanStepper

    engine = NativeEngine.from_pretrained(str(tiny_model_dir), DEVICE, dtype=dtype)
    assert next(engine.model.parameters()).device.type == DEVICE
    assert isinstance(engine.stepper, LeanStepper), type(engine.stepper).__name__


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_log_probs_equal_the_trainers_in_fp32(tiny_model_dir, temperature, record_property):
    if not ON_CPU:  # TF32 matmuls would make fp32 agree to ~1e-3 only
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cuda.matmul.allow_tf32
    engine, trainer, _ = engine_and_trainer(tiny_model_dir, torch.float32, temperature, torch.float32)
    diff = (engine - trainer).abs()
    record_property(f"fp32_t{temperature}_logprob_diff_max", diff.max().item())
    assert diff.max() < 1e-5


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_engine_log_probs_in_bf16_are_as_close_as_bf16_allows(tiny_model_dir, temperature, record_property):
    """A bf16 engine against the trainer computing in bf16 (autocast over fp32 weights). bf16 keeps 8 bits:
    on the CPU the trainer's own bf16 log-probs are 1.2-1.9e-3 (mean) from fp32, so per-token agreement to 1e-3
    is below bf16's resolution. What must hold: the engine is about as close to fp32 as the trainer's bf16
    forward is (it adds no error of its own), and no token is far off (a wrong temperature or position would be)."""
    engine, trainer, batch = engine_and_trainer(tiny_model_dir, torch.bfloat16, temperature, torch.bfloat16)
    exact = Actor(str(tiny_model_dir), DEVICE, actor_settings(temperature=temperature), optim()).log_probs(batch)[0]
    engine_error, trainer_error = (engine - exact).abs().mean().item(), (trainer - exact).abs().mean().item()
    diff = (engine - trainer).abs()
    for name, value in (("diff_mean", diff.mean().item()), ("diff_max", diff.max().item()),
                        ("engine_vs_fp32_mean", engine_error), ("trainer_vs_fp32_mean", trainer_error)):
        record_property(f"bf16_t{temperature}_logprob_{name}", value)
    assert trainer_error > 0 and engine_error <= 2 * trainer_error
    assert diff.max() < 5e-2


def memory_allocated() -> int:
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def test_release_frees_the_engines_weights_and_resume_restores_them(tiny_model_dir, record_property):
    from ascend_rl.rollout.native import NativeEngine
    from ascend_rl.rollout.protocol import SamplingParams

    engine = NativeEngine.from_pretrained(str(tiny_model_dir), DEVICE, dtype=torch.float32,
                                          enable_weights_cpu_backup=True)
    params = SamplingParams(max_new_tokens=8, n=2, sampling_seed=5, ignore_eos=True)
    before = engine.generate(PROMPTS, params, return_logprob=True)
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    held = None if ON_CPU else memory_allocated()
    engine.release_memory_occupation()
    assert {p.device.type for p in engine.model.parameters()} == {"meta"}
    released = None if ON_CPU else memory_allocated()
    engine.resume_memory_occupation()
    assert {p.device.type for p in engine.model.parameters()} == {DEVICE}
    if not ON_CPU:
        resumed = memory_allocated()
        record_property("release_freed_bytes", held - released)
        record_property("weight_bytes", weight_bytes)
        # memory_allocated counts live tensors, not the caching allocator's blocks: the weights leave it and return
        assert held - released >= weight_bytes and resumed - released >= weight_bytes
        assert abs(resumed - held) < 0.01 * weight_bytes
    after = engine.generate(PROMPTS, params, return_logprob=True)
    assert [o.output_ids for o in after] == [o.output_ids for o in before]
    assert [o.output_logprobs for o in after] == [o.output_logprobs for o in before]


def test_the_kv_cache_budget_comes_from_the_devices_memory(tiny_model_dir):
    from ascend_rl.platform import total_memory_bytes
    from ascend_rl.rollout.native import NativeEngine

    engine = NativeEngine.from_pretrained(str(tiny_model_dir), DEVICE, memory_utilization=0.5)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if ON_CPU else torch.cuda.mem_get_info()[1]
    assert total_memory_bytes(DEVICE) == total
    cfg = engine.model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * engine.model.dtype.itemsize
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    assert engine.budget.kv_cache_tokens == int((0.5 * total - weights) // per_token)


# --- the trainer on the device ---------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_the_torch_profiler_traces_a_step_on_the_device(task, tmp_path):
    import json

    from helpers import fit

    prof = tmp_path / "prof"
    fit(task, tmp_path / "run", f"trainer.device={DEVICE}", *BF16, "trainer.total_training_steps=2",
        "global_profiler.tool=torch", "global_profiler.steps=[2]", f"global_profiler.save_path={prof}")
    assert sorted(p.name for p in prof.iterdir()) == ["step_2.top_ops.txt", "step_2.trace.json"]
    events = json.loads((prof / "step_2.trace.json").read_text())["traceEvents"]
    assert {"gen", "reward", "adv", "update_actor", "update_weights"} <= {e.get("name") for e in events}
    if not ON_CPU:  # the GPU's own timeline: kernels, and the runtime calls that launched them
        categories = {e.get("cat") for e in events}
        assert "kernel" in categories and "cuda_runtime" in categories, sorted(c for c in categories if c)


@pytest.mark.timeout(600)
def test_a_checkpoint_of_device_tensors_resumes_to_the_same_next_step(task, tmp_path, record_property):
    """3 steps straight against 2, a checkpoint, a resume in a new trainer and the third, on the device in bf16."""
    from helpers import fit, read_metrics

    extra = [f"trainer.device={DEVICE}", *BF16, "trainer.save_freq=2", f"{A}.actor.use_kl_loss=True",
             "trainer.total_training_steps=3"]
    straight, _ = fit(task, tmp_path / "straight", *extra)
    fit(task, tmp_path / "split", *extra, "trainer.total_training_steps=2")
    assert (tmp_path / "split" / "global_step_2" / "actor" / "dcp" / ".metadata").is_file()
    resumed, result = fit(task, tmp_path / "split", *extra)
    assert result.steps == 3 and result.resumed_step == 2
    c = resumed.c
    assert {p.device.type for p in c.actor.model.parameters()} == {DEVICE}
    assert {p.device.type for p in c.engine.model.parameters()} == {DEVICE}
    assert {p.dtype for p in c.actor.model.parameters()} == {torch.float32}
    if not ON_CPU:  # a CPU without bf16 units computes in fp32 (platform.compute_dtype)
        assert c.engine.model.dtype == torch.bfloat16
    assert {t.device.type for s in c.actor.optimizer.state.values() for t in s.values()
            if torch.is_tensor(t) and t.dim() > 0} == {DEVICE}

    def steps(out):
        return {r["step"]: r for r in read_metrics(out) if "critic/score/mean" in r}

    a, b = steps(tmp_path / "straight"), steps(tmp_path / "split")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    # The step after the resume samples from the restored weights (bit for bit those of the straight run): the
    # same samples; its losses and weights equal up to the noise of unordered sums in backward (see the sharded
    # test). A later step could sample differently from that noise, so the comparison ends here.
    for key in ("critic/score/mean", "response_length/mean", "prompt_length/mean"):
        assert a[3][key] == b[3][key], key
    for key in ("actor/pg_loss", "actor/kl_loss", "actor/grad_norm", "actor/lr"):
        assert a[3][key] == pytest.approx(b[3][key], rel=1e-3, abs=1e-6), key
    mine, theirs = on_host(straight.c.actor.model.named_parameters()), on_host(c.actor.model.named_parameters())
    assert_same_weights(mine, theirs, lr=1e-3, record_property=record_property)  # tiny_overrides' lr
