"""verl's config tree as ascend-rl keeps it (ascend_rl/config/verl/, synced by scripts/sync_verl_config.py):
composition against verl's files, the schema built from them, verl's ways of naming them, the sync script."""

import importlib.util
import tomllib
from pathlib import Path

import pytest
from omegaconf import DictConfig, ListConfig, OmegaConf

from ascend_rl.config import ConfigError, load_config, schema
from ascend_rl.config.loader import compose_tree
from ascend_rl.config.sources import is_verl_config_dir
from ascend_rl.plan import make_plan

A = "actor_rollout_ref"
MODEL = f"{A}.model.path=/models/m"
ROOT = Path(__file__).resolve().parents[1]
VERL = schema.VERL_CONFIG_DIR
GENERATED = {"dp": "_generated_ppo_trainer.yaml", "megatron": "_generated_ppo_megatron_trainer.yaml",
             "torchtitan": "_generated_ppo_torchtitan_trainer.yaml", "veomni": "_generated_ppo_veomni_trainer.yaml"}
# The only verl defaults ascend_rl.yaml changes: both are filled in at run time by verl itself (rollout.name is
# required; verl's auto_set_device replaces cuda with the machine's accelerator).
DELIBERATE = {f"{A}.rollout.name": "???", "trainer.device": "cuda"}
ABSENT = object()


def sync_script():
    spec = importlib.util.spec_from_file_location("sync_verl_config", ROOT / "scripts" / "sync_verl_config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def leaves(node: DictConfig, prefix: str = "") -> dict:
    """Leaf path -> value as written (interpolations unresolved; an empty map is a leaf)."""
    out = {}
    for key in node:
        path, child = f"{prefix}{key}", node._get_node(key)
        if isinstance(child, DictConfig) and len(child):
            out.update(leaves(child, path + "."))
        elif isinstance(child, (DictConfig, ListConfig)):
            out[path] = OmegaConf.to_container(child, resolve=False)
        else:
            out[path] = child._value()
    return out


def verl_differences(engine: str, composed: DictConfig) -> dict:
    ours = leaves(composed)
    verl = leaves(OmegaConf.load(VERL / GENERATED[engine]))
    return {k: (v, ours.get(k, ABSENT)) for k, v in verl.items() if ours.get(k, ABSENT) != v}


@pytest.mark.parametrize("engine", schema.ENGINES)
def test_composed_tree_holds_every_verl_leaf_with_verls_default(engine):
    composed = compose_tree([f"model_engine={engine}"], None, "ppo_trainer")
    differences = verl_differences(engine, composed)
    assert {k: verl for k, (verl, _) in differences.items()} == DELIBERATE
    # the schema reads the same tree from verl's generated file and our overlay
    assert leaves(schema.engine_tree(engine)) == leaves(composed)


def test_ppo_megatron_trainer_is_verls_megatron_tree():
    composed = compose_tree([], None, "ppo_megatron_trainer")
    assert composed.model_engine == "megatron"
    assert {k: verl for k, (verl, _) in verl_differences("megatron", composed).items()} == DELIBERATE


@pytest.mark.parametrize("name,engine", [("ppo_trainer", "dp"), ("ppo_megatron_trainer", "megatron"),
                                         ("ppo_megatron_trainer.yaml", "megatron")])
def test_verls_configs_load_unchanged(name, engine):
    cfg = load_config([], config_name=name)
    assert cfg.model_engine == engine
    assert cfg[A].model.path == "~/models/deepseek-llm-7b-chat"  # verl's default: verl's files mean what they mean
    assert (cfg.trainer.project_name, cfg[A].rollout.max_num_seqs) == ("verl_examples", 256)


def test_verls_own_ppo_trainer_gets_our_keys():
    """verl's file itself (not our ppo_trainer.yaml): nothing unknown, our keys take their defaults."""
    cfg = load_config(["+trainer.seed=5"], config_path=VERL, config_name="ppo_trainer")
    assert (cfg.trainer.seed, cfg.reward.timeout_s, cfg[A].rollout.launch.mode) == (5, 10.0, "engine")
    assert cfg[A].rollout.name == "native"  # verl leaves it required (???)
    assert cfg.trainer.device == "cuda"  # what that file says


@pytest.mark.parametrize("engine", ["megatron", "torchtitan", "veomni"])
def test_model_engine_is_a_group_override(engine):
    cfg = load_config([MODEL, f"model_engine={engine}"])
    assert cfg.model_engine == engine
    assert cfg[A].actor.strategy == engine


@pytest.mark.parametrize("searchpath", [None, "pkg://verl.trainer.config", "file://verl/trainer/config"])
def test_user_yaml_builds_on_verls_names(tmp_path, searchpath):
    hydra = f"hydra:\n  searchpath:\n    - {searchpath}\n" if searchpath else ""
    (tmp_path / "mine.yaml").write_text(
        f"{hydra}defaults:\n  - ppo_megatron_trainer\n  - _self_\n"
        f"{A}:\n  model:\n    path: /models/m\n  rollout:\n    n: 4\n"
        "trainer:\n  seed: 7\n  device: npu\n"
    )
    cfg = load_config(["data.train_batch_size=8"], config_path=tmp_path, config_name="mine")
    assert (cfg.model_engine, cfg[A].rollout.n, cfg.data.train_batch_size) == ("megatron", 4, 8)
    # the user's values come after ours, ours after verl's
    assert (cfg.trainer.seed, cfg.trainer.device, cfg[A].actor.megatron.grad_offload) == (7, "npu", False)


def test_searchpath_on_the_command_line_is_mapped(tmp_path):
    (tmp_path / "mine.yaml").write_text("defaults:\n  - ppo_trainer\n  - _self_\n")
    cfg = load_config([MODEL, "hydra.searchpath=[pkg://verl.trainer.config]"], config_path=tmp_path,
                      config_name="mine")
    assert cfg.model_engine == "dp"


def test_relative_config_path_is_verls_entry_point_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config([MODEL], config_path="config", config_name="ppo_megatron_trainer").model_engine == "megatron"
    # a `config` folder in the current directory comes first, as with Hydra
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "mine.yaml").write_text("defaults:\n  - ppo_trainer\n  - _self_\ndata:\n  shuffle: false\n")
    assert load_config([MODEL], config_path="config", config_name="mine").data.shuffle is False
    with pytest.raises(ConfigError, match="--config-path elsewhere: not a directory"):
        load_config([MODEL], config_path="elsewhere", config_name="mine")


@pytest.mark.parametrize("path,verl", [
    ("pkg://verl.trainer.config", True), ("file://verl/trainer/config", True), ("/src/verl/verl/trainer/config/", True),
    ("file:///home/me/configs", False), ("pkg://my.verl.trainer.configs", False),
])
def test_verl_config_dir_names(path, verl):
    assert is_verl_config_dir(path) is verl


def test_verl_script_keys_load():
    cfg = load_config([
        MODEL,
        "reward_model.reward_manager=dapo",
        "+reward_model.reward_kwargs.overlong_buffer_cfg.enable=True",
        "+reward_model.reward_kwargs.overlong_buffer_cfg.len=512",
        "reward_model.enable=False",
        f"{A}.rollout.multi_turn.tool_config_path=/tools.yaml",
        f"{A}.rollout.layered_summon=True",
        f"{A}.model.use_shm=True",
        "data.image_key=images",
        "critic.ppo_max_token_len_per_gpu=4096",
        "critic.fsdp.param_offload=True",  # verl 0.9.1's spelling (critic.model.fsdp_config is not a 0.9.1 key)
        f"+{A}.actor.optim.override_optimizer_config.foreach=False",
        f"+{A}.model.override_config.attn_implementation=eager",
        f"+{A}.rollout.engine_kwargs.vllm.swap_space=4",
        "+data.apply_chat_template_kwargs.enable_thinking=False",
        "+ray_kwargs.ray_init.runtime_env.env_vars.X=1",
        "trainer.v1.trainer_mode=sync",
    ])
    # verl's legacy reward_model.* keys move where verl 0.9.1 moves them
    assert cfg.reward.reward_manager.name == "dapo"
    assert OmegaConf.to_container(cfg.reward.reward_kwargs) == {"overlong_buffer_cfg": {"enable": True, "len": 512}}
    assert "reward_model" not in cfg and cfg.reward.reward_model.enable is False
    assert cfg[A].rollout.multi_turn.tool_config_path == "/tools.yaml"
    assert cfg[A].actor.optim.override_optimizer_config.foreach is False


def test_megatron_keys_load_with_the_megatron_engine():
    cfg = load_config([MODEL, "model_engine=megatron", f"{A}.actor.megatron.vanilla_mbridge=True",
                       "critic.megatron.tensor_model_parallel_size=2",
                       f"+{A}.actor.megatron.override_transformer_config.recompute_method=uniform",
                       f"+{A}.actor.megatron.override_ddp_config.bucket_size=1"])
    assert (cfg[A].actor.megatron.vanilla_mbridge, cfg.critic.megatron.tensor_model_parallel_size) == (True, 2)
    with pytest.raises(ConfigError, match=r"is in verl's tree for model_engine=megatron.*model_engine=megatron"):
        load_config([MODEL, "critic.megatron.tensor_model_parallel_size=2"])


def test_old_strategy_spelling_selects_megatron():
    cfg = load_config([MODEL, f"{A}.actor.strategy=megatron", f"{A}.actor.megatron.tensor_model_parallel_size=2",
                       f"{A}.actor.megatron.grad_offload=True"])
    assert (cfg.model_engine, cfg[A].actor.megatron.tensor_model_parallel_size) == ("megatron", 2)
    with pytest.raises(ConfigError, match="strategy=megatron needs model_engine=megatron"):
        load_config([MODEL, f"{A}.actor.strategy=megatron", "model_engine=dp"])


def test_open_maps():
    # verl's maps whose default is {} take any key; so do the maps verl extends with +key
    for path in ("data.mm_processor_kwargs.x", "trainer.v1.sampler.sampler_kwargs.x", f"{A}.actor.checkpoint.mbridge_config.x",
                 "reward.reward_kwargs.x.y", "reward_model.reward_kwargs.x", f"{A}.ref.megatron.override_transformer_config.x",
                 "global_profiler.global_tool_config.nsys.x"):
        assert schema.is_known(path), path
    assert not schema.is_known(f"{A}.rollout.engine_kwargs.sglnag.x")
    assert not schema.is_known(f"{A}.rollout.x")
    assert schema.is_known("actor_rollout_ref.actor._target_")  # verl's dataclass names are its keys


def test_float_defaults_written_as_integers_take_floats():
    cfg = load_config([MODEL, f"{A}.rollout.top_p=0.9", f"{A}.rollout.val_kwargs.temperature=0.6",
                       f"{A}.actor.entropy_coeff=0.001"])
    assert cfg[A].rollout.top_p == pytest.approx(0.9)
    with pytest.raises(ConfigError, match="'trainer.total_epochs' expects an integer, got 1.5"):
        load_config([MODEL, "trainer.total_epochs=1.5"])


def test_legacy_sections_move_and_drop_what_verl_drops(caplog):
    cfg = load_config([MODEL, "reward_model.rollout.name=vllm", "+reward_model.micro_batch_size_per_gpu=16",
                       "sandbox_fusion.url=http://sandbox"])
    assert (cfg.reward.reward_model.rollout.name, cfg.reward.sandbox_fusion.url) == ("vllm", "http://sandbox")
    assert "reward_model.micro_batch_size_per_gpu: verl 0.9.1 has no such key" in caplog.text
    with pytest.raises(ConfigError, match="unknown config key 'reward_model.micro_batch_size_per_gpu'"):
        load_config([MODEL, "reward_model.micro_batch_size_per_gpu=16"])  # without +, verl stops too


def test_legacy_reward_model_conflict():
    with pytest.raises(ConfigError, match="'reward_model.reward_manager=dapo' conflicts with 'reward.reward_manager.name=prime'"):
        load_config([MODEL, "reward_model.reward_manager=dapo", "reward.reward_manager.name=prime"])


SAMPLE = """\
# @package _global_
# Format checks enforced on CI: comments above each field.

# the defaults
defaults:
  # <folder_name>@<field_name>: <yaml_file_name>
  - ../optim@optim: fsdp
  - actor@actor_rollout_ref.actor: ${model_engine}_actor
  - override model_engine: megatron
  - _self_

name: ???   # required
lr: 1e-6
steps: 100_000
flag: "true"
message: "a # b"
pick: ${oc.select:actor_rollout_ref.actor.ppo_epochs,1}
empty: {}
items: [model, optimizer]
"""


def test_strip_comments_keeps_hydra_syntax_and_drops_comments():
    sync = sync_script()
    out = sync.strip_comments(SAMPLE)
    assert out.startswith("# @package _global_\n")
    assert [line for line in out.splitlines() if line.lstrip().startswith("#")] == ["# @package _global_"]
    assert "CI" not in out and "required" not in out and "folder_name" not in out
    for kept in ("- ../optim@optim: fsdp", "- actor@actor_rollout_ref.actor: ${model_engine}_actor",
                 "- override model_engine: megatron", "- _self_", "name: ???",
                 "${oc.select:actor_rollout_ref.actor.ppo_epochs,1}"):
        assert kept in out
    data = OmegaConf.create(sync.load(out))
    assert data == OmegaConf.create(sync.load(SAMPLE))
    assert OmegaConf.is_missing(data, "name")
    assert (data.lr, data.steps, data.flag, data.message) == (1e-6, 100000, "true", "a # b")
    assert sync.header_lines("# a comment first\n# @package _global_\nx: 1\n") == []  # not a header to Hydra


def test_vendored_files_are_verls_without_comments():
    """Every file is what the sync script writes: comment-free, and our ppo_trainer.yaml is verl's plus ours."""
    sync = sync_script()
    files = sorted(VERL.rglob("*.yaml"))
    assert len(files) > 40 and (VERL / "model_engine" / "dp.yaml").read_text().startswith("# @package _global_\n")
    for file in files:
        assert sync.strip_comments(file.read_text()) == file.read_text(), file
    version = tomllib.loads((ROOT / "ascend_rl" / "versions.toml").read_text())["verl"]["version"]
    assert sync.pinned_version() == version
    wrapper = (schema.CONFIG_DIR / "ppo_trainer.yaml").read_text()
    assert wrapper == sync.wrapper((VERL / "ppo_trainer.yaml").read_text(), version)


CORPUS = Path(__file__).parent / "data" / "verl_corpus"


def corpus_cases() -> list:
    cases = [c for f in sorted(CORPUS.glob("*.yaml")) for c in OmegaConf.to_container(OmegaConf.load(f))["cases"]]
    return [pytest.param(c, id=c["name"]) for c in cases]


@pytest.mark.parametrize("case", corpus_cases())
def test_verl_style_scripts_load(case, tmp_path, monkeypatch):
    """43 override sets written like verl's example scripts (tests/data/verl_corpus, each key checked against
    verl 0.9.1's trees) compose with no unknown key, from a directory that is not verl's."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(case["overrides"], config_path=case["config_path"], config_name=case["config_name"])
    assert cfg.actor_rollout_ref.model.path.startswith("/models/")
    # plan passes: what we lack is listed as not built, never an error (devices and files are not needed)
    assert make_plan(cfg, {}).errors == []
