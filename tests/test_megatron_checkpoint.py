"""Megatron dist checkpoints (ascend_rl/workers/megatron/checkpoint.py), `ascend-rl convert hf-to-mcore` and
`mcore-to-hf`:
weights saved at TP 2 load exactly at TP 1, the optimizer's state round-trips (the next step is the same as
without the save and load), the converter's checkpoint gives the HF model's logits at TP 1 and TP 2, and what
does not fit is refused with one line naming the path. Tiny models, fp32, gloo, on the CPU."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from test_megatron import COMMON, VOCAB, hf_config, hf_model  # noqa: E402

from ascend_rl.cli.main import main  # noqa: E402
from ascend_rl.workers.megatron import cpu_patches  # noqa: E402
from ascend_rl.workers.megatron.arch import architecture  # noqa: E402
from ascend_rl.workers.megatron.convert import mcore_to_hf  # noqa: E402
from ascend_rl.workers.megatron.model import MegatronParallel  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron")]

BATCH, SEQ = 2, 12
TP1, TP2 = MegatronParallel(), MegatronParallel(tensor_model_parallel_size=2)
TP2_SP = MegatronParallel(tensor_model_parallel_size=2, sequence_parallel=True)


def tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def build(hf_config_, parallel: MegatronParallel, hf_state: dict | None = None):
    """This rank's GPTModel at `parallel`: the HF weights, or Megatron's random initialisation."""
    from ascend_rl.workers.megatron.model import build_gpt_model, init_model_parallel, load_hf_weights

    init_model_parallel(parallel)
    model = build_gpt_model(hf_config_, parallel)
    if hf_state is not None:
        load_hf_weights(model, hf_state, hf_config_, parallel)
    return model


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens(1), torch.arange(SEQ).expand(BATCH, SEQ), attention_mask=None)


def trainer(model, distributed: bool):
    """Megatron's DDP and Adam (DistributedOptimizer when `distributed`) around `model`."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(use_distributed_optimizer=distributed),
                                  model)
    config = OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.5, use_distributed_optimizer=distributed)
    return ddp, get_megatron_optimizer(config, [ddp])


def step(ddp, optimizer, seed: int) -> None:
    from megatron.core.distributed import finalize_model_grads

    from ascend_rl.workers.megatron.logprobs import vocab_parallel_log_probs

    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    ids = tokens(seed)
    out = ddp(ids, torch.arange(SEQ).expand(BATCH, SEQ), attention_mask=None)
    (-vocab_parallel_log_probs(out[:, :-1], ids[:, 1:], VOCAB).mean()).backward()
    finalize_model_grads([ddp])
    assert optimizer.step()[0]


class CheckpointWorker:
    """A worker process of a ProcessWorkerGroup: Megatron on CPU; returns this rank's weights by Megatron name."""

    def __init__(self, rank: int, world_size: int):
        cpu_patches.apply(pytest.MonkeyPatch())

    def save_weights(self, name: str, parallel: MegatronParallel, path: str) -> None:
        from ascend_rl.workers.megatron.checkpoint import save_dist_weights

        hf = hf_model(name)
        save_dist_weights(path, build(hf.config, parallel, hf.state_dict()))

    def load_weights(self, config, parallel: MegatronParallel, path: str) -> dict:
        from ascend_rl.workers.megatron.checkpoint import load_dist_weights
        from ascend_rl.workers.megatron.model import mcore_shard

        model = build(config, parallel)
        load_dist_weights(path, model)
        return {"weights": mcore_shard(model), "logits": logits(model)}

    def load_training(self, config, parallel: MegatronParallel, path: str) -> dict:
        """The weights of a training checkpoint, as Megatron's loader reads them at `parallel`."""
        from ascend_rl.workers.megatron.checkpoint import load_dist_checkpoint
        from ascend_rl.workers.megatron.model import mcore_shard

        model = build(config, parallel)
        load_dist_checkpoint(path, model)
        return {"weights": mcore_shard(model)}

    def train(self, parallel: MegatronParallel, distributed: bool, save: str | None = None,
              resume: str | None = None, fully_reshardable: bool = False, name: str = "qwen3") -> dict:
        """Step 1 from the HF weights then step 2; with `save`, stop after step 1 and save there; with
        `resume`, a fresh (randomly initialised) model and optimizer load it and take step 2."""
        from ascend_rl.workers.megatron.checkpoint import load_dist_checkpoint, save_dist_checkpoint
        from ascend_rl.workers.megatron.model import mcore_shard

        hf = hf_model(name)
        ddp, optimizer = trainer(build(hf.config, parallel, None if resume else hf.state_dict()), distributed)
        if resume:
            load_dist_checkpoint(resume, ddp, optimizer)
        else:
            step(ddp, optimizer, seed=2)
            if save:
                save_dist_checkpoint(save, ddp, optimizer, fully_reshardable=fully_reshardable)
                return {}
        step(ddp, optimizer, seed=3)
        return {"weights": mcore_shard(ddp.module)}

    def refused(self, method: str, *args) -> str:
        """The UserError's message from `method` (a call that raises would close the group)."""
        from ascend_rl.errors import UserError

        with pytest.raises(UserError) as caught:
            getattr(self, method)(*args)
        return str(caught.value)


@pytest.fixture(scope="module")
def workers():
    from ascend_rl.distributed.worker_group import ProcessWorkerGroup

    group = ProcessWorkerGroup(2, "test_megatron_checkpoint:CheckpointWorker", {}, threads_per_worker=1)
    yield group
    group.close()


def as_hf(results: list[dict], name: str, parallel: MegatronParallel) -> dict:
    """The HF state dict from every rank's weights: TP ranks merged (at TP 1 every rank holds the whole)."""
    return mcore_to_hf([r["weights"] for r in results[:parallel.tp]], architecture(hf_config(name)))


def whole_logits(results: list[dict], parallel: MegatronParallel) -> torch.Tensor:
    return torch.cat([r["logits"] for r in results[:parallel.tp]], dim=-1)[..., :VOCAB]


def assert_equal(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize(("name", "saved_at"), [("qwen3", TP2), ("qwen3_moe", TP2_SP)])
def test_weights_saved_at_tp2_load_exactly_at_tp1(name, saved_at, workers, tmp_path):
    path = str(tmp_path / "ckpt")
    workers.call_all("save_weights", name, saved_at, path)
    hf = hf_model(name).state_dict()
    if hf_config(name).tie_word_embeddings:
        hf.pop("lm_head.weight")
    assert_equal(as_hf(workers.call_all("load_weights", hf_config(name), TP1, path), name, TP1), hf)
    if name == "qwen3_moe":  # Transformer Engine's key for the MoE layers' norm, as verl's checkpoints hold it
        from megatron.core.dist_checkpointing.serialization import load_tensors_metadata

        assert "decoder.layers.pre_mlp_layernorm.weight" in load_tensors_metadata(path)


@pytest.mark.parametrize("distributed", [False, True], ids=["optimizer", "distributed-optimizer"])
def test_optimizer_state_round_trip(distributed, workers, tmp_path):
    path = str(tmp_path / "ckpt")
    straight = workers.call_all("train", TP2, distributed)
    workers.call_all("train", TP2, distributed, path)
    resumed = workers.call_all("train", TP2, distributed, None, path)
    for got, want in zip(resumed, straight):
        assert_equal(got["weights"], want["weights"])


def test_fully_reshardable_optimizer_state_resumes_at_another_tp(workers, tmp_path):
    path = str(tmp_path / "ckpt")
    straight = as_hf(workers.call_all("train", TP2, True), "qwen3", TP2)
    workers.call_all("train", TP2, True, path, None, True)
    resumed = as_hf(workers.call_all("train", TP1, True, None, path), "qwen3", TP1)
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, atol=1e-5, rtol=0, msg=key)  # TP 1 rounds otherwise


def test_dp_reshardable_optimizer_state_refuses_another_tp(workers, tmp_path):
    path = tmp_path / "ckpt"
    workers.call_all("train", TP2, True, str(path))
    got = workers.call_all("refused", "train", TP1, True, None, str(path))[0]
    assert got.startswith(f"{path}/optimizer/dist_ckpt: the distributed optimizer's state was saved at "
                          "tensor_model_parallel_size=2"), got
    got = workers.call_all("refused", "load_weights", hf_config("qwen3"), TP2, str(path))[0]
    assert got.endswith(f"a training checkpoint: its weights are in {path}/model/dist_ckpt"), got


def test_an_moe_optimizer_state_saved_under_expert_parallelism_refuses_a_run_without(workers, tmp_path):
    """Megatron gives experts an optimizer of their own only under expert parallelism: the chained state of EP 2
    cannot fill the single optimizer of EP 1 (it would fail inside Megatron with a KeyError)."""
    path = tmp_path / "ckpt"
    workers.call_all("train", MegatronParallel(expert_model_parallel_size=2), True, str(path), None, True, "qwen3_moe")
    got = workers.call_all("refused", "train", MegatronParallel(), True, None, str(path), False, "qwen3_moe")[0]
    assert got.startswith(f"{path}/optimizer/dist_ckpt: the optimizer's state was saved as 2 optimizer(s) and this "
                          "run has 1"), got


def test_convert_command_end_to_end(workers, tmp_path):
    hf = hf_model("qwen3")
    hf.save_pretrained(tmp_path / "hf")
    out = tmp_path / "mcore"
    run = subprocess.run([sys.executable, "-m", "ascend_rl", "convert", "hf-to-mcore", "--hf_model_path",
                          str(tmp_path / "hf"), "--output_path", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    want = hf(input_ids=tokens(1), use_cache=False).logits.detach()
    for parallel in (TP2, TP1):
        got = whole_logits(workers.call_all("load_weights", hf.config, parallel, str(out)), parallel)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_mcore_to_hf_merges_a_training_checkpoint_saved_at_tp2(workers, tmp_path):
    """verl's layout (the HF config in model/huggingface beside model/dist_ckpt), as verl's model_merger reads it:
    the merged model holds what Megatron's own loader reads from the checkpoint, and transformers loads it."""
    import transformers

    local, out = tmp_path / "actor", tmp_path / "merged"
    workers.call_all("train", TP2, True, str(local), None, True)  # one step from the HF weights, saved at TP 2
    hf = hf_model("qwen3")
    hf.config.save_pretrained(local / "model" / "huggingface")
    run = subprocess.run([sys.executable, "-m", "ascend_rl", "convert", "mcore-to-hf", "--local_dir", str(local),
                          "--target_dir", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert f"from the training checkpoint {local}" in run.stdout and "no tokenizer" in run.stdout
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
    merged.pop("lm_head.weight")  # tied to the embedding
    want = as_hf(workers.call_all("load_training", hf.config, TP1, str(local)), "qwen3", TP1)
    assert_equal(merged, want)
    initial = hf.state_dict()
    assert all(not torch.equal(merged[k], initial[k]) for k in merged if k.endswith("q_proj.weight"))  # trained


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_convert_refusals(tmp_path, capsys):
    import transformers

    hf = tmp_path / "hf"
    hf_model("qwen3").save_pretrained(hf)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path / "gpt2")
    convert = ["convert", "hf-to-mcore", "--hf-model"]
    assert "exists" in one_line_error(capsys, [*convert, str(hf), "--output", str(tmp_path / "full")])
    for source, message in [("nope", "no such directory"), ("full", "no config.json"), ("gpt2", "model_type='gpt2'")]:
        assert message in one_line_error(capsys, [*convert, str(tmp_path / source), "--output", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    merge = ["convert", "mcore-to-hf", "--local-dir"]
    assert "no Hugging Face config beside it" in one_line_error(capsys, [*merge, str(tmp_path / "full"),
                                                                         "--target-dir", str(tmp_path / "o")])
    assert "exists" in one_line_error(capsys, [*merge, str(tmp_path / "full"), "--target-dir", str(hf)])
    assert "not a Megatron dist checkpoint" in one_line_error(capsys, [*merge, str(tmp_path / "full"), "--hf-config",
                                                                       str(hf), "--target-dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def test_loader_refusals(workers, tmp_path):
    import transformers

    qwen3 = tmp_path / "qwen3"
    workers.call_all("save_weights", "qwen3", TP2, str(qwen3))
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "metadata.json").write_text("{not json")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    damaged = tmp_path / "damaged"
    shutil.copytree(qwen3, damaged)
    for data in damaged.glob("*.distcp"):
        data.write_bytes(data.read_bytes()[:100])
    wider = transformers.Qwen3Config(**{**COMMON, "intermediate_size": 192}, head_dim=16, tie_word_embeddings=True)
    for path, config, message in [
        (tmp_path / "nope", hf_config("qwen3"), "no such directory"),
        (tmp_path / "hf", hf_config("qwen3"), "not a Megatron dist checkpoint"),
        (garbage, hf_config("qwen3"), "unreadable Megatron dist checkpoint"),
        (damaged, hf_config("qwen3"), "cannot load the model, a damaged file\\? EOFError"),
        (qwen3, hf_config("qwen2"), "does not fit this model: .*no decoder.layers.self_attention.linear_qkv.bias"),
        (qwen3, wider, "does not fit this model: .*linear_fc2.weight is \\(2, 64, 128\\), not \\(2, 64, 192\\)"),
    ]:
        got = workers.call_all("refused", "load_weights", config, TP2, str(path))[0]
        assert got.startswith(f"{path}:") and "\n" not in got, got
        assert re.search(message, got), got
    got = workers.call_all("refused", "save_weights", "qwen3", TP2, str(qwen3))[0]
    assert got.startswith(f"{qwen3} exists; a checkpoint is written to a new"), got


def test_mcore_to_hf_finds_the_config_and_tokenizer_of_an_ascend_rl_checkpoint(tiny_model_dir, tmp_path):
    """ascend-rl's checkpoint keeps the HF export (config, tokenizer) in actor/, beside actor/dcp/."""
    from ascend_rl.cli.convert_cmd import _config_dir, _copy_tokenizer

    actor = tmp_path / "global_step_2" / "actor"
    shutil.copytree(tiny_model_dir, actor)
    (actor / "dcp" / "model" / "dist_ckpt").mkdir(parents=True)
    assert _config_dir(actor / "dcp", None) == actor
    assert _config_dir(actor / "dcp", str(tmp_path)) == tmp_path  # --hf-config wins
    (tmp_path / "out").mkdir()
    assert _copy_tokenizer(actor, tmp_path / "out")
    for name in ("tokenizer_config.json", "tokenizer.json"):
        if (actor / name).is_file():
            assert (tmp_path / "out" / name).is_file(), name
    assert not _copy_tokenizer(actor / "dcp", tmp_path / "out2")
