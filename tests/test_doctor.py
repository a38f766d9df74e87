"""`doctor` on this machine and on simulated Ascend installs: a fake npu-smi on PATH, a fake CANN toolkit tree,
fake packages (dist-info) and a fake torch_npu that reports devices. Every row's pass and fail."""

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from ascend_rl.cli.main import main
from ascend_rl.config import load_config
from ascend_rl.doctor import diagnose
from ascend_rl.doctor.checks import Context, run_checks
from ascend_rl.doctor.probe import PACKAGES, Machine, gather, parse_chip_table

GOOD = {"torch": "2.7.1", "torch_npu": "2.7.1.post2", "torchvision": "0.22.1", "sglang": "0.5.8",
        "sgl_kernel_npu": "2026.1.21", "deep_ep": "1.0.0", "torch_memory_saver": "0.0.9", "triton_ascend": "3.2.0",
        "transformers": "4.57.1", "ray": "2.49.0"}
NPU_ENV = {"HCCL_HOST_SOCKET_PORT_RANGE": "60000-60050", "HCCL_NPU_SOCKET_PORT_RANGE": "61000-61050",
           "RAY_EXPERIMENTAL_NOSET_ASCEND_RT_VISIBLE_DEVICES": "1", "ASCEND_RT_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}

NPU_SMI = """#!/usr/bin/env bash
if [ "$2" = "-t" ]; then
  printf '        Serial Number                  : 0\\n        Software Version               : %s\\n' "$FAKE_HDK"
  exit 0
fi
echo "        NPU ID                         Chip ID                        Chip Logic ID                  Chip Name"
logic=0
for card in 0 1 2 3 4 5 6 7; do
  for die in $(seq 1 "$FAKE_DIES"); do
    echo "        $card                              $((die - 1))                              $logic                              $FAKE_CHIP"
    logic=$((logic + 1))
  done
  echo "        $card                              $FAKE_DIES                              -                              Mcu"
done
"""

FAKE_TORCH_NPU = """import os, types
import torch
count = int(os.environ.get("FAKE_NPU_DEVICES", "8"))
torch.npu = types.SimpleNamespace(is_available=lambda: count > 0, device_count=lambda: count)
"""


# Rows that fail together with another because they read the same fact.
DEPENDS = {"torch": {"torch_npu"}, "HDK (driver)": {"IPC (weight sync)"}, "IPC (weight sync)": {"HDK (driver)"},
           "torch_npu": {"NPU devices"}, "CANN": {"IPC (weight sync)"}, "megatron-core": {"MindSpeed"}}


def fake_dist(site: Path, name: str, version: str, files=()) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))


def fake_checkout(site: Path, name: str, version: str, branch: str) -> None:
    """What `git clone -b BRANCH` and `pip install -e` leave: the checkout's .git/HEAD, and the dist-info's
    direct_url.json pointing at the checkout."""
    checkout = site.parent / "src" / name
    (checkout / ".git").mkdir(parents=True, exist_ok=True)
    (checkout / ".git" / "HEAD").write_text(f"ref: refs/heads/{branch}\n")
    (site / f"{name}-{version}.dist-info" / "direct_url.json").write_text(
        json.dumps({"url": checkout.as_uri(), "dir_info": {"editable": True}}))


@pytest.fixture
def ascend(tmp_path):
    """A simulated A3 node with the seed's stack; returns a function making (environ, site_paths)."""
    site, bin_dir = tmp_path / "site", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "npu-smi").write_text(NPU_SMI)
    (bin_dir / "npu-smi").chmod(0o755)
    toolkit = tmp_path / "Ascend" / "ascend-toolkit" / "latest"
    (toolkit / "x86_64-linux").mkdir(parents=True)

    def make(packages=GOOD, cann="8.3.RC1", hdk="25.3.rc1", dies=2, chip="Ascend910", devices=8, env=NPU_ENV,
             memory_saver_files=()):
        for name, version in packages.items():
            fake_dist(site, name, version, memory_saver_files if name == "torch_memory_saver" else ())
        if "torch_npu" in packages:
            (site / "torch_npu.py").write_text(FAKE_TORCH_NPU)
        (toolkit / "x86_64-linux" / "ascend_toolkit_install.info").write_text(f"package_name=Ascend-cann-toolkit\n"
                                                                            f"version={cann}\n")
        environ = {**os.environ, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ASCEND_HOME_PATH": str(toolkit),
                   "FAKE_HDK": hdk, "FAKE_DIES": str(dies), "FAKE_CHIP": chip, "FAKE_NPU_DEVICES": str(devices)}
        return environ, [str(site)]  # metadata from the fake site only; the probe still imports the real torch
    return make


def statuses(rows) -> dict[str, str]:
    return {r.check: r.status for r in rows}


def test_a_good_a3_install_passes_every_row(ascend):
    environ, paths = ascend()
    device, rows = diagnose(None, environ=environ, site_paths=paths)
    assert device == "npu"  # detected from the Ascend install
    assert set(statuses(rows).values()) == {"OK"}, [r for r in rows if r.status != "OK"]
    kind = next(r for r in rows if r.check == "NPU kind")
    assert kind.found == "A3: 8 card(s), 16 die(s)" and "two per A3 card" in kind.fix
    assert next(r for r in rows if r.check == "NPU devices").found == "torch_npu sees 8"


def test_a2_is_one_die_per_card():
    table = ("NPU ID Chip ID Chip Logic ID Chip Name\n0 0 0 Ascend 910B3\n0 1 - Mcu\n1 0 1 Ascend 910B3\n")
    chips = parse_chip_table(table)
    assert [(c.npu_id, c.name) for c in chips] == [(0, "Ascend 910B3"), (1, "Ascend 910B3")]


@pytest.mark.parametrize("setup,row,status,fix", [
    (dict(packages={**GOOD, "torch_npu": "2.6.0"}), "torch_npu", "FAIL", "needs >= 2.7.1.post2"),
    (dict(packages={**GOOD, "torch": "2.8.0"}), "torch_npu", "FAIL", "pip install torch==2.7.1"),
    (dict(packages={k: v for k, v in GOOD.items() if k != "torch_npu"}), "torch_npu", "FAIL", "torch_npu=="),
    (dict(packages={**GOOD, "torch": "2.6.0", "torch_npu": "2.6.0"}), "torch", "FAIL", "needs >= 2.7.1"),
    (dict(devices=0), "NPU devices", "FAIL", "ASCEND_RT_VISIBLE_DEVICES"),
    (dict(cann="8.2.RC1"), "CANN", "FAIL", "needs >= 8.3.RC1"),
    (dict(hdk="24.1.0"), "HDK (driver)", "FAIL", "needs >= 25.3.RC1"),
    (dict(hdk="24.1.0"), "IPC (weight sync)", "FAIL", "HDK >= 25.3.RC1 and CANN >= 8.3.RC1"),
    (dict(packages={**GOOD, "sglang": "0.5.10"}), "sglang", "WARN", "written for 0.5.8"),
    (dict(packages={k: v for k, v in GOOD.items() if k != "sglang"}), "sglang", "FAIL", "install_sglang_npu.sh"),
    (dict(packages={k: v for k, v in GOOD.items() if k != "sgl_kernel_npu"}), "sgl_kernel_npu", "FAIL", "kernels"),
    (dict(memory_saver_files=("torch_memory_saver_hook_mode_preload_cuda.abi3.so",)), "torch_memory_saver",
     "FAIL", "NPU build"),
    (dict(packages={**GOOD, "triton": "3.4.0"}), "triton", "FAIL", "pip uninstall -y triton"),
    (dict(packages={k: v for k, v in GOOD.items() if k != "triton_ascend"}), "triton", "WARN", "triton-ascend=="),
    (dict(packages={**GOOD, "transformers": "4.40.0"}), "transformers", "FAIL", "transformers>=4.56.1,<6"),
    (dict(packages={k: v for k, v in GOOD.items() if k != "ray"}), "ray", "WARN", "ascend-rl[ray]"),
    (dict(env={k: v for k, v in NPU_ENV.items() if k != "HCCL_NPU_SOCKET_PORT_RANGE"}),
     "HCCL_NPU_SOCKET_PORT_RANGE", "FAIL", "export HCCL_NPU_SOCKET_PORT_RANGE"),
    (dict(packages={**GOOD, "megatron_core": "0.12.1"}), "megatron-core", "FAIL", ">=0.16,<0.17"),
    (dict(packages={**GOOD, "megatron_core": "0.16.1", "mindspeed": "0.12.1"}, cann="8.5.0"), "MindSpeed", "FAIL",
     "MindSpeed core_r0.16.0"),
    (dict(packages={**GOOD, "megatron_core": "0.16.1", "mindspeed": "0.16.0"}), "MindSpeed", "WARN",
     "on CANN >= 8.5.0"),
])
def test_each_row_fails_with_its_fix(ascend, setup, row, status, fix):
    environ, paths = ascend(**setup)
    _, rows = diagnose("npu", environ=environ, site_paths=paths)
    found = [r for r in rows if r.check == row]
    assert found and found[0].status == status and fix in found[0].fix, found
    others = {k: v for k, v in statuses(rows).items() if k != row and k not in DEPENDS.get(row, ())}
    assert set(others.values()) <= {"OK"}, others  # one problem makes one row (plus the rows that depend on it)


def test_toolkit_not_sourced_and_no_driver(ascend):
    environ, paths = ascend()
    environ = {k: v for k, v in environ.items() if k != "ASCEND_HOME_PATH"}
    environ["PATH"] = os.environ["PATH"]  # no npu-smi
    _, rows = diagnose("npu", environ=environ, site_paths=paths)
    by_check = {r.check: r for r in rows}
    assert by_check["CANN"].status == "FAIL" and "set_env.sh" in by_check["CANN"].fix
    assert by_check["HDK (driver)"].found == "npu-smi not found on PATH"


def test_python_other_than_311_fails_on_npu_only(ascend):
    environ, paths = ascend()
    machine = replace(gather(environ, paths), python="3.10.14")
    assert statuses(run_checks(machine, Context("npu")))["python"] == "FAIL"
    assert statuses(run_checks(machine, Context("cpu")))["python"] == "OK"


def test_config_needs_are_checked_with_overrides(ascend):
    environ, paths = ascend()
    cfg = load_config(["actor_rollout_ref.model.path=/m", "trainer.n_gpus_per_node=16",
                       "actor_rollout_ref.rollout.name=sglang",
                       "+actor_rollout_ref.rollout.engine_kwargs.sglang.moe_a2a_backend=deepep",
                       "actor_rollout_ref.model.lora_rank=8"])
    _, rows = diagnose("npu", cfg, environ=environ, site_paths=paths)
    by_check = {r.check: r for r in rows}
    assert by_check["SGLANG_DEEPEP_BF16_DISPATCH"].status == "FAIL"
    assert by_check["ASCEND_RT_VISIBLE_DEVICES"].fix == ("ASCEND_RT_VISIBLE_DEVICES lists 8 device(s) but "
                                                        "trainer.n_gpus_per_node=16")
    assert by_check["NPU kind"].status == "OK"  # 16 dies on this simulated A3 node
    assert any(r.check == "config" and "LoRA is not built yet" in r.found for r in rows)


def test_doctor_here_on_cpu(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["device"] == "cpu" and report["ok"]
    rows = {r["check"]: r for r in report["rows"]}
    assert rows["python"]["found"].startswith("3.11") and rows["torch"]["status"] == "OK"
    assert "torch_npu" not in rows  # NPU rows do not apply here
    assert rows["C++ compiler"]["status"] == "OK"  # this machine builds the CPU decode kernels


def test_doctor_warns_without_a_cxx_compiler():
    machine = Machine("3.11.7", {}, dict.fromkeys(PACKAGES), cxx=None)
    row = next(r for r in run_checks(machine, Context("cpu")) if r.check == "C++ compiler")
    assert row.status == "WARN" and "eager ops" in row.fix and "g++" in row.fix


# --- Megatron: megatron-core in the engine's range, and on NPUs MindSpeed's branch for that core line ----------

MEGATRON_CFG = ["actor_rollout_ref.model.path=/m", "actor_rollout_ref.actor.strategy=megatron"]
FSDP_CFG = ["actor_rollout_ref.model.path=/m"]


def megatron_row(device: str, overrides, cann="8.5.0", branch=None, **packages) -> tuple[str, str, str]:
    """(status, found, fix) of the megatron-core row, or of MindSpeed's when `mindspeed` is among the packages."""
    machine = Machine("3.11.7", {}, {**dict.fromkeys(PACKAGES), **packages}, cann=cann,
                      git_branches={"mindspeed": branch})
    config = load_config(overrides) if overrides is not None else None
    check = "MindSpeed" if "mindspeed" in packages else "megatron-core"
    row = next(r for r in run_checks(machine, Context(device, config)) if r.check == check)
    return row.status, row.found, row.fix


@pytest.mark.parametrize("device,fix", [("cpu", "pip install 'megatron-core==0.16.1'"),
                                        ("cuda", "pip install 'megatron-core==0.16.1'"),
                                        ("npu", "USE_MEGATRON=1 bash scripts/install_sglang_npu.sh")])
@pytest.mark.parametrize("overrides,installed,status", [
    (MEGATRON_CFG, "0.16.1", "OK"), (None, "0.16.1", "OK"),
    (MEGATRON_CFG, "0.12.1", "FAIL"), (None, "0.12.1", "FAIL"), (FSDP_CFG, "0.12.1", "WARN"),
    (MEGATRON_CFG, None, "FAIL"), (None, None, "OK"), (FSDP_CFG, None, "OK"),
])
def test_megatron_core_in_range_out_of_range_and_missing(device, fix, overrides, installed, status):
    found_status, found, found_fix = megatron_row(device, overrides, megatron_core=installed)
    assert found_status == status and found == (installed or "not installed")
    if status == "OK" and installed:
        assert found_fix == ""
        return
    assert found_fix.endswith(fix)  # every other row says how to install it
    if installed:  # the version found, the range needed
        assert ("==0.16.1" if device == "cpu" else ">=0.16,<0.17") in found_fix
    else:
        assert ("actor.strategy=megatron needs" if status == "FAIL" else "needed only for") in found_fix


def test_megatron_core_on_the_cpu_is_the_version_the_cpu_patches_are_written_for():
    status, _, fix = megatron_row("cpu", MEGATRON_CFG, megatron_core="0.16.0")
    assert status == "FAIL" and "==0.16.1 (its CPU patches are pinned to it)" in fix
    assert megatron_row("cuda", MEGATRON_CFG, megatron_core="0.16.0")[0] == "OK"
    assert megatron_row("npu", MEGATRON_CFG, megatron_core="0.17.0")[0] == "FAIL"


@pytest.mark.parametrize("overrides,kwargs,status,found,fix", [
    # verl 0.9.1's MindSpeed adapts Megatron core 0.12
    (MEGATRON_CFG, dict(mindspeed="0.12.1", branch="2.3.0_core_r0.12.1"), "FAIL", "0.12.1 (2.3.0_core_r0.12.1)",
     "another Megatron core line; ascend-rl's engine needs MindSpeed core_r0.16.0 (Megatron core 0.16): "
     "USE_MEGATRON=1 bash scripts/install_sglang_npu.sh"),
    (None, dict(mindspeed="0.12.1"), "FAIL", "0.12.1", "MindSpeed core_r0.16.0"),
    (FSDP_CFG, dict(mindspeed="0.12.1"), "WARN", "0.12.1", "MindSpeed core_r0.16.0"),
    (MEGATRON_CFG, dict(mindspeed="0.16.0", branch="core_r0.16.0"), "OK", "0.16.0 (core_r0.16.0)", ""),
    (MEGATRON_CFG, dict(mindspeed="0.16.0"), "OK", "0.16.0", ""),  # a wheel or a detached checkout: no branch
    (MEGATRON_CFG, dict(mindspeed="0.16.0", branch="master"), "WARN", "0.16.0 (master)", "pinned: MindSpeed core_r0"),
    (MEGATRON_CFG, dict(mindspeed="0.16.0", cann="8.3.RC1"), "WARN", "0.16.0 on CANN 8.3.RC1", "CANN >= 8.5.0"),
    (MEGATRON_CFG, dict(mindspeed=None), "FAIL", "not installed", "runs through MindSpeed core_r0.16.0"),
    (None, dict(mindspeed=None), "WARN", "not installed", "runs through MindSpeed core_r0.16.0"),  # megatron-core
    (None, dict(mindspeed=None, megatron_core=None), "OK", "not installed", "needed only for"),
])
def test_mindspeed_matches_the_pin_on_npu(overrides, kwargs, status, found, fix):
    found_status, found_found, found_fix = megatron_row("npu", overrides, **{"megatron_core": "0.16.1", **kwargs})
    assert (found_status, found_found) == (status, found) and fix in found_fix
    if status == "OK" and found != "not installed":
        assert found_fix == ""


def test_mindspeed_is_ascend_only():
    for device in ("cpu", "cuda"):
        machine = Machine("3.11.7", {}, {**dict.fromkeys(PACKAGES), "megatron_core": "0.16.1"})
        assert "MindSpeed" not in statuses(run_checks(machine, Context(device, load_config(MEGATRON_CFG))))


def test_mindspeed_version_and_branch_are_read_from_its_editable_install(ascend):
    environ, paths = ascend(packages={**GOOD, "megatron_core": "0.16.1", "mindspeed": "0.12.1"}, cann="8.5.0")
    fake_checkout(Path(paths[0]), "mindspeed", "0.12.1", "2.3.0_core_r0.12.1")
    rows = {r.check: r for r in diagnose("npu", environ=environ, site_paths=paths)[1]}
    assert (rows["MindSpeed"].status, rows["MindSpeed"].found) == ("FAIL", "0.12.1 (2.3.0_core_r0.12.1)")
    assert rows["megatron-core"].status == "OK"


def test_a_good_a3_install_with_megatron_passes_every_row(ascend):
    environ, paths = ascend(packages={**GOOD, "megatron_core": "0.16.1", "mindspeed": "0.16.0"}, cann="8.5.0")
    fake_checkout(Path(paths[0]), "mindspeed", "0.16.0", "core_r0.16.0")
    _, rows = diagnose("npu", environ=environ, site_paths=paths)
    assert set(statuses(rows).values()) == {"OK"}, [r for r in rows if r.status != "OK"]
    assert next(r for r in rows if r.check == "MindSpeed").found == "0.16.0 (core_r0.16.0)"
