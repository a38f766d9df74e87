"""ServerArgs field lists of real SGLang releases (an optional check; the core tests never import SGLang).

  python scripts/sglang_fields.py check MODEL_DIR PLAN.json...   in a venv with SGLang: its fields equal our committed
      list for that version, and ServerArgs(**kwargs) builds for every replica of every plan (`plan --json`)
  python scripts/sglang_fields.py write                in a venv with SGLang: (re)write the committed list
  python scripts/sglang_fields.py from-wheel WHEEL     no install: the list from the wheel's source
      (dataclass releases, <= 0.5.19, whose fields are the class's annotated attributes)

Driven by scripts/check_sglang_versions.sh, which builds one venv per version.
"""

from __future__ import annotations

import ast
import json
import sys
import zipfile
from pathlib import Path

SNAPSHOTS = Path(__file__).resolve().parents[1] / "ascend_rl" / "rollout" / "sglang" / "fields"


def installed() -> tuple[str, object, set[str]]:
    import dataclasses

    import sglang
    from sglang.srt.server_args import ServerArgs

    if dataclasses.is_dataclass(ServerArgs):
        names = {f.name for f in dataclasses.fields(ServerArgs)}
    else:
        import msgspec

        names = {f.name for f in msgspec.structs.fields(ServerArgs)}
    return sglang.__version__, ServerArgs, names


def write() -> int:
    version, _, names = installed()
    (SNAPSHOTS / f"{version}.txt").write_text("\n".join(sorted(names)) + "\n")
    print(f"wrote {len(names)} fields of SGLang {version}")
    return 0


def from_wheel(wheel: str) -> int:
    with zipfile.ZipFile(wheel) as zf:
        version = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA")).split("-")[1].split(".dist")[0]
        tree = ast.parse(zf.read("sglang/srt/server_args.py"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ServerArgs")
    if not any("dataclass" in ast.unparse(d) for d in cls.decorator_list):
        print(f"SGLang {version}: ServerArgs is not a dataclass here; install it and use `write`", file=sys.stderr)
        return 1
    names = sorted(n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name))
    (SNAPSHOTS / f"{version}.txt").write_text("\n".join(names) + "\n")
    print(f"wrote {len(names)} fields of SGLang {version} (from the wheel's source)")
    return 0


def check(plans: list[str], model_dir: str) -> int:
    version, server_args_cls, names = installed()
    failures = []
    snapshot = SNAPSHOTS / f"{version}.txt"
    if snapshot.is_file():
        committed = set(snapshot.read_text().split())
        if committed != names:
            failures.append(f"committed list differs: missing {sorted(names - committed)[:5]}, "
                            f"extra {sorted(committed - names)[:5]}")
    else:
        print(f"note: no committed list for {version}; `write` adds one")
    eager = not hasattr(server_args_cls, "resolve_once")  # <= 0.5.18 resolve in __post_init__
    for plan_file in plans:
        plan = json.loads(Path(plan_file).read_text())
        for replica in plan["sglang_server_args"]:
            # Eager versions read the model and query the device while constructing; "dummy" skips that.
            kwargs = {**replica["kwargs"], "model_path": "dummy" if eager else model_dir}
            try:
                server_args_cls(**kwargs)
            except Exception as err:  # noqa: BLE001 - report every failing recipe, then fail
                failures.append(f"{Path(plan_file).stem} replica {replica['replica']}: {type(err).__name__}: {err}")
    for failure in failures:
        print(f"FAIL SGLang {version}: {failure}")
    print(f"SGLang {version}: {len(plans)} plan(s) checked, {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "check":
        sys.exit(check(args[1:], model_dir=args[0]))
    sys.exit({"write": write, "from-wheel": lambda: from_wheel(args[0])}[command]())
