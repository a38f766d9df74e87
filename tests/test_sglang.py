"""SGLang backend: ServerArgs per version (real field lists of 0.5.8 and 0.5.23), launch flags, weight buckets,
and the trainer driving each launch mode end to end over real HTTP or in process (SGLang itself replaced by
tests/fake_sglang, which has 0.5.8's fields and SGLang's shapes but generates with our native engine)."""

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from test_plan import run_recipe
from test_trainer import read_metrics, tiny_overrides

from ascend_rl.cli.main import main
from ascend_rl.config import load_config
from ascend_rl.config.layout import compute_layout
from ascend_rl.errors import UserError
from ascend_rl.rollout.server_process import ServerProcess, cli_args, free_port
from ascend_rl.rollout.sglang import fields as sglang_fields
from ascend_rl.rollout.sglang.fields import ServerArgsFields, field_names, snapshot_fields
from ascend_rl.rollout.sglang.server_args import plan_server_args
from ascend_rl.rollout.weight_sync import tensor_buckets
from ascend_rl.trainer.components import build_components
from ascend_rl.trainer.loop import RLTrainer

A = "actor_rollout_ref"
FAKE_SGLANG = Path(__file__).with_name("fake_sglang")
V058, V0523 = snapshot_fields("0.5.8"), snapshot_fields("0.5.23")
NPU = [f"{A}.model.path=/models/m", "trainer.device=npu", "trainer.n_gpus_per_node=8",
       f"{A}.rollout.name=sglang", f"{A}.rollout.tensor_model_parallel_size=4"]


def server_args(*overrides, fields=V058, environ=None, replica=0, device="npu"):
    cfg = load_config([*NPU, *overrides])
    return plan_server_args(cfg, compute_layout(cfg, device).rollout, device, fields, environ or {}, replica=replica)


# --- field lists and version branching -----------------------------------------------------------------

def test_field_lists_of_two_versions_differ_where_sglang_changed():
    assert len(V058.names) == 325 and len(V0523.names) == 546
    assert {"enable_dp_attention", "cuda_graph_max_bs", "enable_weights_cpu_backup"} <= V058.names
    assert "attn_dp_size" not in V058 and "deepep_dispatcher_output_dtype" not in V058
    assert {"attn_dp_size", "deepep_dispatcher_output_dtype", "cuda_graph_max_bs_decode"} <= V0523.names
    assert "cuda_graph_max_bs" not in V0523


def test_field_names_read_dataclass_and_msgspec_records():
    import msgspec

    assert field_names(dataclasses.make_dataclass("S", ["model_path", "tp_size"])) == {"model_path", "tp_size"}
    struct = msgspec.defstruct("ServerArgs", [("model_path", str), ("attn_dp_size", int, 1)])
    with pytest.raises(TypeError):
        dataclasses.fields(struct)  # what breaks verl on SGLang >= 0.5.20
    assert field_names(struct) == {"model_path", "attn_dp_size"}


@pytest.mark.parametrize("fields", [V058, V0523], ids=["0.5.8", "0.5.23"])
@pytest.mark.parametrize("script", ["run_qwen3_30b_a3b_grpo_megatron_sglang_a3.sh",
                                    "run_qwen2_5_32b_grpo_fsdp_sglang_a2_2nodes.sh",
                                    "run_qwen3_8b_grpo_fsdp_sglang_1k.sh", "run_qwen3_8b_grpo_fsdp_sglang_32k.sh"])
def test_every_recipe_key_is_a_server_args_field(script, fields, tmp_path):
    plan = run_recipe(script, tmp_path)
    replicas = plan["sglang_server_args"]
    assert len(replicas) == plan["layout"]["rollout"]["replicas"]
    for replica in replicas:
        assert set(replica["kwargs"]) <= fields.names, set(replica["kwargs"]) - fields.names
        assert replica["kwargs"]["device"] == "npu" and replica["kwargs"]["attention_backend"] == "ascend"
        assert replica["kwargs"]["tp_size"] == 4 and replica["kwargs"]["enable_memory_saver"] is True
    # every process sees all NPUs (the scripts export RAY_EXPERIMENTAL_NOSET_...=1): replicas pick their slice
    per_node = plan["layout"]["devices_per_node"]
    assert [r["kwargs"]["base_gpu_id"] for r in replicas] == [(4 * r) % per_node for r in range(len(replicas))]


def test_verl_keys_map_to_server_args():
    plan = server_args(f"{A}.rollout.gpu_memory_utilization=0.3", f"{A}.rollout.enforce_eager=True",
                       f"{A}.rollout.max_num_seqs=64", f"{A}.rollout.data_parallel_size=2",
                       f"{A}.rollout.expert_parallel_size=8", "trainer.seed=5")
    kw = plan.kwargs
    assert (kw["mem_fraction_static"], kw["disable_cuda_graph"], kw["max_running_requests"]) == (0.3, True, 64)
    assert (kw["tp_size"], kw["dp_size"], kw["ep_size"], kw["random_seed"]) == (8, 2, 8, 5)  # SGLang DP inside TP
    assert (kw["load_format"], kw["skip_tokenizer_init"], kw["skip_server_warmup"]) == ("dummy", True, True)
    assert plan.errors == [] and plan.warnings == []
    assert "enable_deterministic_inference" not in kw
    for fields in (V058, V0523):  # trainer.deterministic asks SGLang for the same
        assert server_args("trainer.deterministic=True", fields=fields).kwargs["enable_deterministic_inference"]


def test_unknown_engine_kwarg_names_key_version_and_closest_fields():
    plan = server_args(f"+{A}.rollout.engine_kwargs.sglang.chunked_prefil_size=4096")
    assert plan.errors == [f"{A}.rollout.engine_kwargs.sglang.chunked_prefil_size: SGLang 0.5.8 (its field list; "
                           f"SGLang is not installed here) has no ServerArgs field 'chunked_prefil_size' "
                           f"(closest: chunked_prefill_size, disable_chunked_prefix_cache)"]


def test_renamed_and_deprecated_fields_depend_on_the_version():
    old = server_args(f"+{A}.rollout.engine_kwargs.sglang.cuda_graph_max_bs=32",
                      f"+{A}.rollout.engine_kwargs.sglang.enable_dp_attention=True")
    assert old.errors == [] and old.warnings == []
    new = server_args(f"+{A}.rollout.engine_kwargs.sglang.cuda_graph_max_bs=32",
                      f"+{A}.rollout.engine_kwargs.sglang.enable_dp_attention=True", fields=V0523)
    assert len(new.errors) == 1 and "use cuda_graph_max_bs_decode" in new.errors[0]
    assert new.warnings == [f"{A}.rollout.engine_kwargs.sglang.enable_dp_attention: deprecated since SGLang 0.5.23; "
                            f"use attn_dp_size (--attn-dp-size)"]


def test_deepep_dispatch_is_an_env_var_before_and_a_field_after_it_existed():
    deepep = f"+{A}.rollout.engine_kwargs.sglang.moe_a2a_backend=deepep"
    old, new = server_args(deepep), server_args(deepep, fields=V0523)
    assert old.env == {"SGLANG_DEEPEP_BF16_DISPATCH": "1"} and "deepep_dispatcher_output_dtype" not in old.kwargs
    assert new.env == {} and new.kwargs["deepep_dispatcher_output_dtype"] == "bf16"


def test_attention_backend_on_npu_is_ascend_whatever_is_passed():
    plan = server_args(f"+{A}.rollout.engine_kwargs.sglang.attention_backend=fa3")
    assert plan.kwargs["attention_backend"] == "ascend"
    assert plan.warnings == [f"{A}.rollout.engine_kwargs.sglang.attention_backend=fa3: SGLang uses "
                             f"attention_backend=ascend on npu whatever is passed; passing ascend"]
    cuda = server_args(f"+{A}.rollout.engine_kwargs.sglang.attention_backend=fa3", device="cuda")
    assert cuda.kwargs["attention_backend"] == "fa3" and cuda.warnings == []


def test_base_gpu_id_only_when_every_process_sees_all_devices():
    noset = {"RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES": "1"}
    assert server_args(replica=1, environ=noset).kwargs["base_gpu_id"] == 4
    assert server_args(replica=1).kwargs["base_gpu_id"] == 0  # Ray narrowed the visible devices itself


def test_our_optional_defaults_are_dropped_for_versions_without_them():
    fields = ServerArgsFields("0.5.2", V058.names - {"enable_weights_cpu_backup"}, installed=False)
    plan = server_args(fields=fields)
    assert "enable_weights_cpu_backup" not in plan.kwargs and plan.errors == []
    assert plan.notes == ["enable_weights_cpu_backup left out: SGLang 0.5.2 (its field list; SGLang is not "
                          "installed here) has no such field"]


def test_plan_errors_on_a_bad_sglang_key(capsys):
    code = main(["plan", *NPU, f"+{A}.rollout.engine_kwargs.sglang.no_such_field=1"])
    out = capsys.readouterr().out
    assert code == 1
    assert "error: actor_rollout_ref.rollout.engine_kwargs.sglang.no_such_field: SGLang 0.5.8" in out
    assert "                 attention_backend='ascend'" in out


def test_cli_args_are_launch_server_flags():
    assert cli_args({"model_path": "/m", "tp_size": 2, "enable_memory_saver": True, "disable_cuda_graph": False,
                     "random_seed": None, "cuda_graph_bs": [1, 2], "json_model_override_args": {"a": 1}}) == [
        "--model-path", "/m", "--tp-size", "2", "--enable-memory-saver", "--cuda-graph-bs", "1", "2",
        "--json-model-override-args", '{"a": 1}']


# --- weight buckets ------------------------------------------------------------------------------------------

def test_buckets_respect_the_size_and_keep_order():
    named = [(f"w{i}", torch.zeros(n)) for i, n in enumerate([100, 100, 300, 50, 50])]  # float32: 4 bytes each
    buckets = list(tensor_buckets(named, bucket_bytes=800))
    assert [[n for n, _ in b] for b in buckets] == [["w0", "w1"], ["w2"], ["w3", "w4"]]
    assert [n for n, _ in next(tensor_buckets([("big", torch.zeros(1000))], 800))] == ["big"]  # alone, not dropped


# --- launch modes end to end ---------------------------------------------------------------------------------

@pytest.fixture
def fake_sglang(monkeypatch):
    monkeypatch.syspath_prepend(str(FAKE_SGLANG))
    monkeypatch.setenv("PYTHONPATH", f"{FAKE_SGLANG}:{':'.join(sys.path)}")
    sglang_fields.installed_fields.cache_clear()
    yield
    sglang_fields.installed_fields.cache_clear()
    for name in [m for m in sys.modules if m == "sglang" or m.startswith("sglang.")]:
        del sys.modules[name]


def train(task, out, *extra, steps=2):
    cfg = load_config(tiny_overrides(task, out, f"trainer.total_training_steps={steps}", "trainer.test_freq=0",
                                     *extra))
    trainer = RLTrainer(build_components(cfg, show_progress=False))
    trainer.fit()
    return trainer, [r for r in read_metrics(out) if "critic/score/mean" in r]


def assert_engine_has_the_trained_weights(steps):
    # Step 2's rollout ran on the weights step 1 trained and pushed: its log-probs match the actor's.
    assert steps[1]["rollout/logprob_diff_max"] < 1e-4
    assert steps[0]["rollout/weight_sync_buckets"] >= 1 and steps[0]["rollout/weight_sync_gib"] > 0
    assert {"timing_s/wake_weights", "timing_s/push_weights", "timing_s/wake_kv_cache"} <= set(steps[0])


def test_native_server_mode_trains_over_http_with_weights_by_disk(task, tmp_path):
    out = tmp_path / "run"
    trainer, steps = train(task, out, f"{A}.rollout.launch.mode=server",
                           f"{A}.rollout.checkpoint_engine.update_weights_bucket_megabytes=1")
    assert trainer.c.rollout.description.endswith("(weights by disk)")
    assert_engine_has_the_trained_weights(steps)
    assert steps[0]["rollout/weight_sync_buckets"] >= 2  # 1 MB buckets of a 1.6 MB model
    assert trainer.c.rollout.server.process.poll() is not None  # the server stopped with the run
    assert len(list((out / "rollout_weights").iterdir())) == 1  # older pushes are removed


def test_attach_to_a_running_server_by_url(task, tmp_path):
    model, _ = task
    port = free_port()
    server = ServerProcess([sys.executable, "-m", "ascend_rl", "serve", "--model-path", str(model), "--port",
                            str(port), "--weights-root", str(tmp_path)], f"http://127.0.0.1:{port}",
                           tmp_path / "serve.log")
    try:
        server.wait_until_healthy(120)
        # rollout.name=sglang needs no SGLang here: the server is SGLang-compatible and weights go by disk
        _, steps = train(task, tmp_path / "run", f"{A}.rollout.name=sglang",
                         f"{A}.rollout.launch.url=http://127.0.0.1:{port}")
        assert_engine_has_the_trained_weights(steps)
    finally:
        server.close()


def test_sglang_engine_mode_in_process(task, tmp_path, fake_sglang):
    import sglang

    sglang.CALLS.clear()
    trainer, steps = train(task, tmp_path / "run", f"{A}.rollout.name=sglang", f"{A}.rollout.load_format=auto")
    assert_engine_has_the_trained_weights(steps)
    init_keys = sglang.CALLS[0][1]
    assert {"enable_memory_saver", "skip_tokenizer_init", "device", "tp_size"} <= set(init_keys)
    kinds = [c[0] for c in sglang.CALLS]
    # per step: generate → release → resume weights → push → resume KV → flush; shutdown at the end
    first = kinds.index("generate")
    assert kinds[first:first + 6] == ["generate", "release_memory_occupation", "resume_memory_occupation",
                                      "update_weights_from_tensor", "resume_memory_occupation", "flush_cache"]
    assert sglang.CALLS[first + 1][1] == ["kv_cache", "weights"] and kinds[-1] == "shutdown"
    assert [c[1] for c in sglang.CALLS if c[0] == "generate"] == [8, 8]  # 4 prompts × n=2, one request each


@pytest.mark.timeout(600)
@pytest.mark.parametrize("tp,engines", [(1, 2), (2, 1)])
def test_sglang_engines_in_the_actor_workers(task, tmp_path, fake_sglang, tp, engines):
    """Two workers: with TP 1 each holds a replica's Engine, with TP 2 the first holds the one replica's. The
    engines generate the steps' rollouts and take the weights from the workers' own shards."""
    trainer, steps = train(task, tmp_path / "run", f"{A}.rollout.name=sglang", f"{A}.rollout.load_format=auto",
                           "trainer.n_gpus_per_node=2", f"{A}.rollout.tensor_model_parallel_size={tp}")
    where = "the first of every 2 " if tp == 2 else ""
    assert trainer.c.rollout.description == f"{engines} sglang engine(s) in {where}actor workers (colocated)"
    assert_engine_has_the_trained_weights(steps)


def test_colocated_sglang_plans_one_engine_per_replica_on_its_devices(fake_sglang):
    from ascend_rl.distributed.colocated import worker_rollout_spec

    spec = worker_rollout_spec(load_config([*NPU, "trainer.n_gpus_per_node=16"]), "npu")
    assert (spec.name, spec.devices_per_replica, len(spec.sglang)) == ("sglang", 4, 4)
    assert [kw["base_gpu_id"] for kw in spec.sglang] == [0, 4, 8, 12]  # worker processes see every device
    assert [spec.leads(rank) for rank in range(8)] == [True, False, False, False] * 2
    on_ray = worker_rollout_spec(load_config([*NPU, "trainer.nnodes=2"]), "npu")  # NPU workers get NOSET=1
    assert [kw["base_gpu_id"] for kw in on_ray.sglang] == [0, 4, 0, 4]
    with pytest.raises(UserError, match="inside Ray workers need every worker to see its node's devices: set "
                                        "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1"):
        worker_rollout_spec(load_config([*NPU, "trainer.nnodes=2", "trainer.device=cuda"]), "cuda")
    with pytest.raises(UserError, match="a rollout replica of 16 devices spans nodes"):
        worker_rollout_spec(load_config([*NPU, "trainer.nnodes=2", f"{A}.rollout.tensor_model_parallel_size=16"]),
                            "npu")


def test_sglang_server_mode_launches_launch_server_with_flags(task, tmp_path, fake_sglang):
    trainer, steps = train(task, tmp_path / "run", f"{A}.rollout.name=sglang", f"{A}.rollout.launch.mode=server")
    assert "sglang.launch_server" in trainer.c.rollout.description
    assert_engine_has_the_trained_weights(steps)


def test_weights_by_broadcast_over_a_process_group(task, tmp_path):
    # update_weights_from_distributed: the trainer (rank 0) and the server join a gloo group once, then every
    # bucket is broadcast into tensors the server allocates from its names, dtypes and shapes
    trainer, steps = train(task, tmp_path / "run", f"{A}.rollout.launch.mode=server",
                           f"{A}.rollout.launch.weight_transport=distributed",
                           f"{A}.rollout.checkpoint_engine.update_weights_bucket_megabytes=1")
    assert trainer.c.rollout.description.endswith("(weights by distributed)")
    assert_engine_has_the_trained_weights(steps)
    assert trainer.c.rollout.push_weights.group is None  # destroyed at the end of the run


def test_a_server_that_dies_while_starting_is_one_clear_error(tmp_path):
    server = ServerProcess([sys.executable, "-c", "import sys; print('bad flag --tp'); sys.exit(2)"],
                           f"http://127.0.0.1:{free_port()}", tmp_path / "s.log")
    with pytest.raises(UserError, match=r"exited with code 2 while starting .* ends with: bad flag --tp"):
        server.wait_until_healthy(30)


def test_sglang_missing_is_a_startup_error(task, tmp_path, capsys):
    code = main(["train", "--no-progress", *tiny_overrides(task, tmp_path / "run", f"{A}.rollout.name=sglang")])
    assert code == 2
    assert "rollout.name=sglang: SGLang is not installed here" in capsys.readouterr().err


def test_weight_transport_without_http_is_an_error():
    from ascend_rl.plan import make_plan

    plan = make_plan(load_config([f"{A}.model.path=/m", f"{A}.rollout.launch.weight_transport=disk"]), environ={})
    assert any("weight_transport=disk applies over HTTP" in e for e in plan.errors)


def test_rollout_name_defaults_to_sglang_where_installed_on_a_device(fake_sglang):
    base = [f"{A}.model.path=/m"]
    assert load_config([*base, "trainer.device=npu"])[A].rollout.name == "sglang"
    assert load_config([*base, "trainer.device=cpu"])[A].rollout.name == "native"  # SGLang on CPU needs its own build
    assert load_config([*base, "trainer.device=npu", f"{A}.rollout.name=native"])[A].rollout.name == "native"


def test_rollout_name_defaults_to_native_without_sglang():
    assert load_config([f"{A}.model.path=/m", "trainer.device=npu"])[A].rollout.name == "native"
