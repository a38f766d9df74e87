"""`ascend-rl doctor`: this machine against the stack in `versions.toml`, one row per check with its fix."""

from __future__ import annotations

from dataclasses import asdict

from ascend_rl.doctor.checks import FAIL, Context, Row, run_checks
from ascend_rl.doctor.probe import Machine, gather


def target_device(m: Machine) -> str:
    """npu when anything Ascend is present (so a broken install is diagnosed as one), else cuda, else cpu."""
    ascend_signs = (m.packages["torch_npu"], m.hdk, m.environ.get("ASCEND_HOME_PATH"))
    if any(ascend_signs) or (m.npu_smi_error and "not found" not in m.npu_smi_error):
        return "npu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def diagnose(device: str | None = None, config=None, environ=None, site_paths=None) -> tuple[str, list[Row]]:
    machine = gather(environ, site_paths)
    device = device or target_device(machine)
    plan = None
    if config is not None:
        from omegaconf import OmegaConf

        from ascend_rl.plan import make_plan

        if config.trainer.device is None:  # the config is checked for the device being diagnosed
            config = config.copy()
            OmegaConf.update(config, "trainer.device", device)
        plan = make_plan(config, machine.environ)
    return device, run_checks(machine, Context(device, config, plan))


def format_rows(device: str, rows: list[Row]) -> str:
    width = max(len(r.check) for r in rows)
    found_width = min(48, max(len(r.found) for r in rows))
    lines = [f"ascend-rl doctor: checking this machine for {device}", ""]
    lines += [f"{r.status:<4}  {r.check:<{width}}  {r.found:<{found_width}}  {r.fix}".rstrip() for r in rows]
    failed = sum(r.status == FAIL for r in rows)
    lines += ["", f"{failed} problem(s) to fix" if failed else "all checks passed"]
    return "\n".join(lines)


def rows_json(device: str, rows: list[Row]) -> dict:
    return {"device": device, "ok": not any(r.status == FAIL for r in rows), "rows": [asdict(r) for r in rows]}
