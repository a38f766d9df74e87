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
