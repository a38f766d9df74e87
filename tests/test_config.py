"""Config loading: Hydra's override grammar on verl's tree, unknown keys, legacy keys, types, user YAML."""

import pytest

from ascend_rl.cli.main import main
from ascend_rl.config import ConfigError, load_config

A = "actor_rollout_ref"
MODEL = f"{A}.model.path=/models/m"  # naming a model selects verl's defaults rather than the embedded run


def test_plain_override_changes_an_existing_key():
    cfg = load_config([MODEL, "data.train_batch_size=32", f"{A}.actor.optim.lr=1e-6"])
    assert cfg.data.train_batch_size == 32
    assert cfg[A].actor.optim.lr == pytest.approx(1e-6)


def test_verl_defaults_when_a_model_is_named():
    cfg = load_config([MODEL])
    assert cfg.data.train_batch_size == 1024
    assert cfg.algorithm.adv_estimator == "gae"
    assert cfg[A].rollout.tensor_model_parallel_size == 2
    assert cfg.trainer.n_gpus_per_node == 8


def test_embedded_default_without_a_model(tmp_path):
    cfg = load_config([])
    assert cfg[A].model.path == str(tmp_path / "cache" / "embedded-v1" / "tiny-qwen3-sft")
    assert cfg.algorithm.adv_estimator == "grpo"
    assert cfg.trainer.n_gpus_per_node == 1


def test_plus_adds_into_open_maps_and_double_plus_overrides():
    cfg = load_config([
        MODEL,
        f'+{A}.rollout.engine_kwargs.sglang.attention_backend="ascend"',
        f"+{A}.rollout.engine_kwargs.sglang.chunked_prefill_size=-1",
        f"+{A}.actor.megatron.override_transformer_config.recompute_method=uniform",
        f"++{A}.rollout.engine_kwargs.sglang.deepep_mode=auto",
        f"++{A}.rollout.n=8",
    ])
    sglang = cfg[A].rollout.engine_kwargs.sglang
    assert dict(sglang) == {"attention_backend": "ascend", "chunked_prefill_size": -1, "deepep_mode": "auto"}
    assert cfg[A].actor.megatron.override_transformer_config.recompute_method == "uniform"
    assert cfg[A].rollout.n == 8


def test_plus_on_an_existing_key_is_hydras_error():
    with pytest.raises(ConfigError, match="already at 'actor_rollout_ref.rollout.n'"):
        load_config([MODEL, f"+{A}.rollout.n=8"])


def test_tilde_deletes_an_open_map_key_but_not_a_required_one():
    cfg = load_config([MODEL, f"+{A}.rollout.engine_kwargs.sglang.x=1", f"~{A}.rollout.engine_kwargs.sglang.x"])
    assert dict(cfg[A].rollout.engine_kwargs.sglang) == {}
    with pytest.raises(ConfigError, match=r"'trainer.logger' was removed"):
        load_config([MODEL, "~trainer.logger"])


def test_list_and_null_values():
    cfg = load_config([MODEL, """trainer.logger=["console","tensorboard"]""", "data.val_files=null",
                       f"{A}.actor.profiler.ranks=[0]", "data.train_files=[a.parquet,b.parquet]"])
    assert list(cfg.trainer.logger) == ["console", "tensorboard"]
    assert cfg.data.val_files is None
    assert list(cfg[A].actor.profiler.ranks) == [0]
    assert list(cfg.data.train_files) == ["a.parquet", "b.parquet"]
    # verl scripts also pass a single logger as a string
    assert load_config([MODEL, "trainer.logger=console"]).trainer.logger == "console"


def test_interpolations_follow_overrides():
    cfg = load_config([MODEL, "data.max_prompt_length=2048", "trainer.project_name=p", "trainer.experiment_name=e"])
    assert cfg[A].rollout.prompt_length == 2048
    assert cfg.trainer.default_local_dir == "checkpoints/p/e"


@pytest.mark.parametrize("override,suggestion", [
    (f"{A}.rollout.nmae=sglang", f"'{A}.rollout.name'"),
    (f"{A}.actor.ppo_mini_batch=16", f"'{A}.actor.ppo_mini_batch_size'"),
    ("trainer.n_gpu_per_node=4", "'trainer.n_gpus_per_node'"),
    (f"+{A}.rollout.engine_kwargs.sglnag.attention_backend=ascend", f"'{A}.rollout.engine_kwargs.sglang'"),
    # keys that only verl's whole tree has, and its open maps
    (f"{A}.rollout.layerd_summon=True", f"'{A}.rollout.layered_summon'"),
    ("reward_model.reward_manger=dapo", "'reward_model.reward_manager'"),
    (f"+{A}.actor.optim.overide_optimizer_config.x=1", f"'{A}.actor.optim.override_optimizer_config'"),
    ("data.imag_key=images", "'data.image_key'"),
    (f"+{A}.modle.override_config.x=1", f"'{A}.model.override_config'"),
])
def test_unknown_key_names_it_and_suggests(override, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config([MODEL, override])
    (message,) = err.value.messages
    key = override.lstrip("+").split("=")[0]
    assert message.startswith(f"unknown config key '{key}'")
    assert suggestion in message


def test_unknown_key_exits_nonzero_with_one_line(capsys):
    assert main(["plan", MODEL, f"{A}.rollout.nmae=sglang"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: unknown config key '{A}.rollout.nmae' (did you mean '{A}.rollout.name', "
                   f"'{A}.rollout.n', '{A}.rollout.mode'?)"]


def test_legacy_top_level_custom_reward_function_is_moved():
    cfg = load_config([MODEL, "custom_reward_function.path=/r.py", "custom_reward_function.name=score"])
    assert cfg.reward.custom_reward_function.path == "/r.py"
    assert cfg.reward.custom_reward_function.name == "score"
    assert "custom_reward_function" not in cfg


def test_legacy_and_new_reward_keys_conflict():
    with pytest.raises(ConfigError, match="conflicts with 'reward.custom_reward_function.path=/b.py'"):
        load_config([MODEL, "custom_reward_function.path=/a.py", "reward.custom_reward_function.path=/b.py"])


@pytest.mark.parametrize("override,message", [
    ("trainer.total_epochs=abc", "'trainer.total_epochs' expects an integer, got 'abc'"),
    ("data.shuffle=maybe", "'data.shuffle' expects true or false, got 'maybe'"),
    (f"{A}.actor.optim.lr=fast", f"'{A}.actor.optim.lr' expects a number, got 'fast'"),
])
def test_wrong_types_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config([MODEL, override])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="cannot parse override"):
        load_config([MODEL, "data.train_batch_size=[1"])


def test_user_yaml_builds_on_ours_and_is_checked(tmp_path):
    (tmp_path / "mine.yaml").write_text(
        "defaults:\n  - ppo_trainer\n  - _self_\n"
        "actor_rollout_ref:\n  model:\n    path: /models/m\n  rollout:\n    n: 4\n"
    )
    cfg = load_config(["data.train_batch_size=8"], config_path=tmp_path, config_name="mine")
    assert (cfg[A].rollout.n, cfg.data.train_batch_size, cfg[A].actor.ppo_epochs) == (4, 8, 1)

    (tmp_path / "typo.yaml").write_text("defaults:\n  - ppo_trainer\n  - _self_\ntrainer:\n  totl_epochs: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trainer.totl_epochs' .*typo"):
        load_config([], config_path=tmp_path, config_name="typo")


def test_missing_user_config_is_one_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config([], config_path=tmp_path, config_name="absent")
    assert "absent" in str(err.value) and "\n" not in str(err.value)


def test_external_lib_registers_names_before_validation(tmp_path, monkeypatch):
    from ascend_rl.algorithms import ADV_ESTIMATORS
    from ascend_rl.plan import make_plan

    (tmp_path / "my_estimators.py").write_text(
        "from ascend_rl.algorithms import register_adv_estimator\n"
        "@register_adv_estimator('zero_adv')\n"
        "def zero_adv(*, response_mask, **_):\n    return response_mask * 0, response_mask * 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        cfg = load_config([MODEL, f"{A}.model.external_lib=my_estimators", "algorithm.adv_estimator=zero_adv"])
        assert "zero_adv" in ADV_ESTIMATORS
        assert not [e for e in make_plan(cfg, {}).errors if "adv_estimator" in e]
    finally:
        ADV_ESTIMATORS._entries.pop("zero_adv", None)
    with pytest.raises(ConfigError, match="external_lib=not_a_module: cannot import"):
        load_config([MODEL, f"{A}.model.external_lib=not_a_module"])


def test_bool_is_not_an_integer():
    with pytest.raises(ConfigError, match="'actor_rollout_ref.actor.ppo_epochs' expects an integer, got True"):
        load_config([MODEL, f"{A}.actor.ppo_epochs=true"])


def test_a_plus_key_verl_lacks_is_added_then_dropped_with_a_warning(caplog):
    """Hydra, so verl, takes `+data.enable_thinking=True` (verl's GLM-4.1V script): nothing reads it."""
    cfg = load_config([MODEL, "+data.enable_thinking=True"])
    assert "enable_thinking" not in cfg.data
    assert "data.enable_thinking: verl 0.9.1 has no such key; added with '+', it has no effect here" in caplog.text
    with pytest.raises(ConfigError, match="unknown config key 'data.enable_thinking'"):
        load_config([MODEL, "data.enable_thinking=True"])  # without '+', Hydra refuses it too


def test_the_cpu_preset_is_verls_tree_with_one_process_settings():
    """`--config-name cpu`: any model and data on one CPU process; the embedded default is built on it."""
    cfg = load_config([MODEL, "data.train_files=/t.parquet"], config_name="cpu")
    assert (cfg.trainer.device, cfg.trainer.n_gpus_per_node, cfg[A].rollout.n, cfg[A].rollout.name) == ("cpu", 1, 8, "native")
    assert list(cfg.trainer.logger) == ["console", "tensorboard"]
    assert cfg.critic.model.path == "/models/m"  # a critic, when asked for, is a value head on the same model
    assert cfg.trainer.default_local_dir == "checkpoints/ascend_rl/cpu_grpo"
    embedded = load_config([])
    assert (embedded[A].rollout.n, embedded.trainer.device, embedded.data.train_batch_size) == (8, "cpu", 64)
