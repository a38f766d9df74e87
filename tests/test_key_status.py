"""Every key of verl's config has one status here (config/key_status.py), and the statuses act: honoured keys
are read where the table says, no-effect keys warn when set, not-built keys stop `train` unless their
feature is off in the run."""

import importlib.util
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ascend_rl.config import load_config
from ascend_rl.config.key_status import Honoured, NoEffect, NotBuilt, status_of
from ascend_rl.data.dataset import DataError, read_prompt_rows
from ascend_rl.plan import make_plan
from ascend_rl.reward.managers import check_reward_kwargs, make_reward_manager

A = "actor_rollout_ref"
ROOT = Path(__file__).resolve().parents[1]
BASE = [f"{A}.model.path=/models/m", "trainer.device=cpu", "algorithm.adv_estimator=grpo", f"{A}.rollout.n=2"]


def doc_script():
    spec = importlib.util.spec_from_file_location("config_keys_doc", ROOT / "scripts" / "config_keys_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def plan(*overrides: str):
    return make_plan(load_config(list(BASE) + list(overrides)))


def test_every_leaf_of_every_verl_tree_has_a_status():
    keys = doc_script().leaf_keys()
    assert len(keys) > 1300  # all four engines' trees, legacy sections included
    assert [k for k in keys if status_of(k) is None] == []


def test_each_honoured_key_is_named_by_its_reader():
    """A cheap guard against a table that claims more than the code does: the module said to read a key
    mentions it."""
    wrong = []
    for key in doc_script().leaf_keys():
        status = status_of(key)
        if isinstance(status, Honoured):
            source = (ROOT / "ascend_rl" / status.reader).read_text()
            needle = status.needle or key.rsplit(".", 1)[-1]
            if not re.search(rf"\b{re.escape(needle)}\b", source):
                wrong.append((key, status.reader))
    assert wrong == []


def test_docs_config_keys_is_generated_from_the_table():
    assert (ROOT / "docs" / "config-keys.md").read_text() == doc_script().render(), \
        "run: python scripts/config_keys_doc.py"


@pytest.mark.parametrize("key, kind", [
    (f"{A}.actor.ppo_epochs", Honoured), (f"{A}.rollout.enforce_eager", Honoured),
    (f"{A}.rollout.enable_chunked_prefill", NoEffect), (f"{A}.model.use_liger", NoEffect),
    ("critic.optim.lr", Honoured), ("critic.model.lora_rank", NotBuilt),
    (f"{A}.actor.megatron.tensor_model_parallel_size", Honoured),
    (f"{A}.actor.megatron.pipeline_model_parallel_size", Honoured),
    (f"{A}.actor.megatron.virtual_pipeline_model_parallel_size", NotBuilt),
    (f"{A}.actor.optim.lr_decay_style", Honoured),  # only Megatron's tree has it
    ("critic.optim.lr_decay_style", Honoured),  # a Megatron critic's
    ("critic.megatron.pipeline_model_parallel_size", Honoured),
    ("critic.megatron.use_dist_checkpointing", NotBuilt),
    ("reward_model.enable", NotBuilt),  # legacy: the status of reward.reward_model.enable
    ("reward_model.reward_manager", Honoured),  # legacy: reward.reward_manager.name
])
def test_statuses_of_some_keys(key, kind):
    assert isinstance(status_of(key), kind)


def test_a_no_effect_key_set_warns_and_at_its_default_is_silent():
    assert any(w.startswith(f"{A}.model.use_liger: has no effect here") for w in plan(f"{A}.model.use_liger=True").warnings)
    assert not any("use_liger" in w for w in plan(f"{A}.model.use_liger=False").warnings)


def test_a_feature_key_of_an_unused_feature_warns_instead_of_stopping():
    p = plan(f"{A}.model.lora_alpha=32")
    assert f"{A}.model.lora_alpha: has no effect: model.lora_rank is 0" in " ".join(p.warnings)
    assert not any("LoRA" in u for u in p.unsupported)


def test_critic_settings_wait_for_a_critic():
    """As in verl, a run without a critic leaves the critic's settings unused (the embedded default carries
    critic settings for `algorithm.adv_estimator=gae`): no warning, no stop."""
    p = plan("critic.ppo_micro_batch_size_per_gpu=4")
    assert not any("critic" in w for w in p.warnings) and p.unsupported == []


def test_a_not_built_key_stops_naming_the_feature_and_the_keys():
    p = plan(f"{A}.model.lora_rank=8", f"{A}.model.lora_alpha=32")
    [line] = [u for u in p.unsupported if "LoRA" in u]
    assert f"{A}.model.lora_rank" in line and f"{A}.model.lora_alpha" in line
    assert "for now use" in line


def test_an_open_map_set_counts_as_set():
    p = plan(f"+{A}.model.override_config.attention_dropout=0.1")
    assert any("model.override_config" in u for u in p.unsupported)


def test_ppo_with_a_critic_plans_and_its_unbuilt_keys_stop():
    assert plan("algorithm.adv_estimator=gae", "critic.optim.lr=1e-5", "critic.model.path=/models/m").unsupported == []
    [line] = plan("algorithm.adv_estimator=gae", "critic.model.lora_rank=8").unsupported
    assert line.startswith("LoRA is not built yet (critic.model.lora_rank)")


def test_megatron_keys_compare_with_megatrons_defaults():
    """A Megatron run's untouched Megatron keys are not 'set' (they were compared with dp's tree, where they are
    absent)."""
    p = plan("model_engine=megatron")
    assert not any(".megatron." in w for w in p.warnings)
    assert p.unsupported == []  # on a CPU it runs: no key counts as set
    assert "Megatron's interleaved (virtual) pipeline" in " ".join(
        plan("model_engine=megatron", f"{A}.actor.megatron.virtual_pipeline_model_parallel_size=2").unsupported)
    assert plan("model_engine=megatron", f"{A}.actor.megatron.pipeline_model_parallel_size=2").unsupported == []


# --- data keys ---------------------------------------------------------------------------------------------

def _parquet(path: Path, **extra_columns) -> Path:
    columns = {"prompt": [[{"role": "user", "content": "1+1?"}]], "data_source": ["arithmetic"],
               "reward_model": [{"ground_truth": "2"}], **extra_columns}
    pq.write_table(pa.table(columns), path)
    return path


def test_a_media_column_is_refused_not_dropped(tmp_path):
    path = _parquet(tmp_path / "vlm.parquet", images=[["img.png"]])
    with pytest.raises(DataError, match=r"media column\(s\) 'images'.*multimodal data is not built"):
        read_prompt_rows([path], media_keys=["images", "videos", None])
    assert len(read_prompt_rows([path], media_keys=["pictures"])) == 1  # data.image_key names another column


# --- reward managers -----------------------------------------------------------------------------------------

DAPO = {"overlong_buffer_cfg": {"enable": True, "len": 4, "penalty_factor": 2.0, "log": True}, "max_resp_len": 10}


def test_dapo_overlong_penalty_is_verls():
    """verl: reward = score + min(−(L − (max − len)) / len · factor, 0)."""
    shaped = make_reward_manager("dapo", DAPO)(torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([3, 6, 8, 10]))
    assert shaped.rewards.tolist() == pytest.approx([1.0, 1.0, -1.0, -1.0])
    assert shaped.metrics == pytest.approx({"reward/overlong_reward/mean": -0.75, "reward/overlong_fraction": 0.5})


def test_dapo_without_the_buffer_and_naive_return_the_scores():
    scores = torch.tensor([0.5, 1.0])
    for name, kwargs in (("naive", DAPO), ("dapo", {}), ("dapo", {"overlong_buffer_cfg": {"enable": False}})):
        assert make_reward_manager(name, kwargs)(scores, torch.tensor([100, 100])).rewards.tolist() == [0.5, 1.0]


@pytest.mark.parametrize("kwargs, message", [
    ({"overlong_buffer_cfg": {"enable": True, "len": 4}}, "max_resp_len must be set"),
    ({"overlong_buffer_cfg": {"enable": True, "len": 0}, "max_resp_len": 10}, "len=0 must be a positive integer"),
    ({"overlong_buffer_cfg": {"enable": True, "len": 16}, "max_resp_len": 10}, "max_resp_len=10 must be at least"),
])
def test_dapo_settings_are_checked_like_verl(kwargs, message):
    [error] = check_reward_kwargs("dapo", kwargs)
    assert message in error


def test_reward_manager_in_a_verl_script_plans():
    """The legacy spelling verl's DAPO scripts use, overlong buffer included."""
    p = plan("reward_model.reward_manager=dapo", "+reward_model.reward_kwargs.overlong_buffer_cfg.enable=True",
             "+reward_model.reward_kwargs.overlong_buffer_cfg.len=512",
             "+reward_model.reward_kwargs.overlong_buffer_cfg.penalty_factor=1.0",
             "+reward_model.reward_kwargs.max_resp_len=2048")
    assert p.errors == [] and p.unsupported == []
    bad = plan("reward.reward_manager.name=dapo", "+reward.reward_kwargs.overlong_buffer_cfg.enable=True")
    assert any("overlong_buffer_cfg.len=None" in e for e in bad.errors)


def test_verl_reward_managers_we_lack_are_not_built_and_typos_are_errors():
    assert any("reward manager 'prime'" in u for u in plan("reward.reward_manager.name=prime").unsupported)
    assert any("reward.reward_manager.name='nave'" in e for e in plan("reward.reward_manager.name=nave").errors)



# --- the optimizer ---------------------------------------------------------------------------------------------

def test_optimizer_impl_and_overrides_are_verls():
    from ascend_rl.workers.optimizer import OptimSettings, build_optimizer

    params = [torch.nn.Parameter(torch.zeros(2))]
    adamw = build_optimizer(params, OptimSettings(lr=0.1, overrides={"eps": 1e-5, "amsgrad": True}))
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["eps"] == 1e-5 and adamw.defaults["amsgrad"]
    sgd = build_optimizer(params, OptimSettings(lr=0.1, optimizer="SGD", overrides={"momentum": 0.9}))
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.9  # no betas for a non-Adam name
    with pytest.raises(ValueError, match="rejects its arguments"):
        build_optimizer(params, OptimSettings(optimizer="SGD", overrides={"nonsense": 1}))


def test_an_optimizer_that_is_not_here_is_named_before_training():
    assert any("optimizer_impl=torchao_nope.optim: cannot import it" in m
               for m in plan(f"{A}.actor.optim.optimizer_impl=torchao_nope.optim").missing_inputs)
    assert any("optimizer=AdamW9000: torch.optim has no such optimizer" in m
               for m in plan(f"{A}.actor.optim.optimizer=AdamW9000").missing_inputs)


@pytest.mark.parametrize("estimator", ["optimal_token_baseline", "tir_optimal_token_baseline", "gdpo"])
def test_estimators_whose_inputs_the_trainer_lacks_stop_at_start_up(estimator):
    [line] = [u for u in plan(f"algorithm.adv_estimator={estimator}").unsupported if estimator in u]
    assert "which the trainer does not compute yet" in line
