"""Device detection and the per-device table, with the NPU and CUDA branches simulated on a CPU."""

import sys

import pytest
import torch

from ascend_rl.errors import UserError
from ascend_rl.platform import detect_device, resolve_device


@pytest.fixture()
def fake_torch_npu(tmp_path, monkeypatch):
    """A torch_npu stand-in: importing it registers torch.npu, as the real package does."""
    def install(available: bool):
        (tmp_path / "torch_npu.py").write_text(
            "import types, torch\n"
            f"torch.npu = types.SimpleNamespace(is_available=lambda: {available})\n"
        )
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
        monkeypatch.setattr(torch, "npu", None, raising=False)
    yield install
    sys.modules.pop("torch_npu", None)  # the fake that detection imported must not outlive the test


def test_cpu_when_nothing_else(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert detect_device() == "cpu"


def test_npu_when_torch_npu_sees_a_device(fake_torch_npu):
    fake_torch_npu(available=True)
    assert detect_device() == "npu"


def test_torch_npu_without_a_device_falls_through(fake_torch_npu, monkeypatch):
    fake_torch_npu(available=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert detect_device() == "cuda"


def test_trainer_device_overrides_detection(fake_torch_npu):
    fake_torch_npu(available=True)
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(UserError, match="trainer.device='tpu': expected one of cpu, cuda, npu"):
        resolve_device("tpu")


def test_npu_workers_get_the_mandatory_variables_unless_set():
    from ascend_rl.platform import worker_env

    env, defaulted = worker_env("npu", {"HCCL_HOST_SOCKET_PORT_RANGE": "50000-50050"})
    assert env["HCCL_HOST_SOCKET_PORT_RANGE"] == "50000-50050"  # the user's value wins
    assert env["RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES"] == "1"
    assert "HCCL_NPU_SOCKET_PORT_RANGE=61000-61050" in defaulted
    assert not any(d.startswith("HCCL_HOST_SOCKET_PORT_RANGE") for d in defaulted)
    assert worker_env("cpu", {}) == ({}, [])


def test_worker_device_is_the_local_rank_or_the_one_ray_assigned():
    from ascend_rl.platform import device_index, get_platform

    npu, cuda = get_platform("npu"), get_platform("cuda")
    assert device_index(npu, 3, {}, []) == 3  # worker processes on one node
    # Ray with RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES=1: every device visible, take the assigned one
    assert device_index(npu, 1, {"ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}, ["5"]) == 5
    assert device_index(npu, 1, {"ASCEND_RT_VISIBLE_DEVICES": "4,5,6,7"}, ["6"]) == 2
    # Ray narrowing the variable to the assigned device: it is device 0 of this process
    assert device_index(cuda, 1, {"CUDA_VISIBLE_DEVICES": "6"}, ["6"]) == 0
    assert device_index(cuda, 1, {}, ["2"]) == 2
    with pytest.raises(UserError, match="CUDA_VISIBLE_DEVICES=0,1 does not list device 3, which Ray gave"):
        device_index(cuda, 0, {"CUDA_VISIBLE_DEVICES": "0,1"}, ["3"])


def test_a_worker_makes_its_device_current(monkeypatch):
    import types

    from ascend_rl.platform import get_platform, select_worker_device

    chosen = []
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(set_device=chosen.append), raising=False)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert select_worker_device("npu") == "npu:3" and chosen == [3]
    assert select_worker_device("cpu") == "cpu" and chosen == [3]
    assert get_platform("npu").process_group_backend == "cpu:gloo,npu:hccl"
    assert get_platform("cuda").process_group_backend == "cpu:gloo,cuda:nccl"
    assert get_platform("cpu").process_group_backend == "gloo"


def test_deterministic_mode_sets_the_platform_switches_where_unset():
    from ascend_rl.platform import deterministic_requested, make_deterministic, worker_env

    environ = {"HCCL_DETERMINISTIC": "false"}  # the user's own choice stays
    try:
        defaulted = make_deterministic("npu", environ)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert environ == {"HCCL_DETERMINISTIC": "false", "LCCL_DETERMINISTIC": "1", "CLOSE_MATMUL_K_SHIFT": "1",
                       "ATB_MATMUL_SHUFFLE_K_ENABLE": "0", "ASCEND_RL_DETERMINISTIC": "1"}
    assert "HCCL_DETERMINISTIC=true" not in defaulted and deterministic_requested(environ)
    ray_env, _ = worker_env("cuda", {}, deterministic=True)  # what Ray workers get in their runtime environment
    assert ray_env == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8", "ASCEND_RL_DETERMINISTIC": "1"}
    assert worker_env("cuda", {})[0] == {}


def test_openmp_waits_passively_unless_the_user_chose():
    from ascend_rl.platform import apply_cpu_thread_defaults

    env = {}
    assert apply_cpu_thread_defaults(env) == ["OMP_WAIT_POLICY=PASSIVE"] and env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert apply_cpu_thread_defaults(env) == [] and env["OMP_WAIT_POLICY"] == "ACTIVE"


def test_the_cli_sets_the_wait_policy_before_torch_starts(tmp_path):
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads it: the CLI must set it first."""
    import subprocess

    code = ("import os, sys; os.environ.pop('OMP_WAIT_POLICY', None); from ascend_rl.cli.main import main; "
            "assert 'torch' not in sys.modules; "
            f"main(['data', 'arithmetic', {str(tmp_path / 'd')!r}, '--train-size', '4', '--test-size', '1']); "
            "print(os.environ['OMP_WAIT_POLICY'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[-1] == "PASSIVE"


def test_a_device_kind_this_machine_lacks_stops_the_run_at_once(monkeypatch):
    from ascend_rl import platform

    monkeypatch.setattr(platform, "detect_device", lambda: "cpu")
    assert platform.usable_device("cpu") == "cpu" and platform.usable_device(None) == "cpu"
    with pytest.raises(UserError, match=r"trainer.device=cuda: this machine has no usable cuda device .* set "
                                        r"trainer.device=cpu"):
        platform.usable_device("cuda")


def test_serve_dtype_follows_sglang_and_the_model_config(tmp_path, monkeypatch):
    import json

    from ascend_rl import platform
    from ascend_rl.cli.serve_cmd import engine_dtype

    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    monkeypatch.setattr(platform, "cpu_units", lambda dtype: ["amx_bf16"])
    assert engine_dtype("auto", str(tmp_path), "cpu") == torch.bfloat16
    assert engine_dtype("half", str(tmp_path), "cuda") == torch.float16
    assert engine_dtype("float", str(tmp_path), "cpu") == torch.float32
    monkeypatch.setattr(platform, "cpu_units", lambda dtype: [])  # no bf16 units: fp32, said once
    assert engine_dtype("bfloat16", str(tmp_path), "cpu") == torch.float32
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float64"}))
    with pytest.raises(UserError, match=r"--dtype=auto: .*config.json torch_dtype=float64: expected one of"):
        engine_dtype("auto", str(tmp_path), "cpu")
