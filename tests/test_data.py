"""Tiny model, datasets in verl's schema, the prompt pipeline and the resumable sampler."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ascend_rl.cli.main import main
from ascend_rl.data.dataset import DataError, load_prompts, truncate
from ascend_rl.data.sampler import ResumableBatchSampler
from ascend_rl.data.tasks import GSM8K_INSTRUCTION, arithmetic_rows, convert_gsm8k, gsm8k_ground_truth
from ascend_rl.errors import UserError

SAMPLE = "ascend_rl/data/samples/gsm8k_sample.jsonl"


def test_tiny_model_loads_with_auto_classes_and_generates(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "qwen3"
    assert (tiny_model_dir / "model.safetensors").stat().st_size < 5 * 2**20
    text = tok.apply_chat_template([{"role": "user", "content": "2+3="}], add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>user\n2+3=<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text  # character-level: lossless round trip
    out = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False)
    assert len(ids) < out.shape[1] <= len(ids) + 4


def test_cli_builds_tiny_model_and_arithmetic(tmp_path, capsys):
    assert main(["data", "tiny-model", str(tmp_path / "m"), "--hidden-size", "64", "--layers", "1"]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["hidden_size"] == 64
    assert main(["data", "arithmetic", str(tmp_path / "a"), "--train-size", "50", "--test-size", "10"]) == 0
    assert pq.ParquetFile(tmp_path / "a" / "train.parquet").metadata.num_rows == 50


def test_arithmetic_schema_is_verls_and_splits_are_disjoint():
    rows = arithmetic_rows(200, 50, max_operand=20, seed=3)
    row = rows["train"][0]
    assert set(row) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    a, b = map(int, row["prompt"][0]["content"].rstrip("=").split("+"))
    assert row["reward_model"] == {"style": "rule", "ground_truth": str(a + b)}
    assert row["data_source"] == "arithmetic"
    questions = lambda split: {r["prompt"][0]["content"] for r in rows[split]}  # noqa: E731
    assert not questions("train") & questions("test")
    assert arithmetic_rows(200, 50, 20, 3) == rows  # seeded
    assert arithmetic_rows(200, 50, 20, 4) != rows


def test_arithmetic_too_many_rows_is_an_error():
    with pytest.raises(UserError, match="only 16 distinct problems"):
        arithmetic_rows(10, 10, max_operand=3, seed=0)


def test_gsm8k_conversion_matches_verl(tmp_path):
    out = convert_gsm8k([SAMPLE], tmp_path)
    rows = pq.read_table(out["train"]).to_pylist()
    assert len(rows) == 20
    first = rows[0]
    assert first["data_source"] == "openai/gsm8k"
    assert first["prompt"][0]["content"].endswith(" " + GSM8K_INSTRUCTION)
    assert first["reward_model"]["ground_truth"] == "15"
    by_truth = {r["extra_info"]["index"]: r["reward_model"]["ground_truth"] for r in rows}
    assert by_truth[6] == "3750"  # commas removed
    assert by_truth[10] == "-7"
    assert first["extra_info"]["split"] == "train"


def test_gsm8k_reads_parquet_and_hf_dirs(tmp_path):
    records = [json.loads(line) for line in Path(SAMPLE).read_text().splitlines()]
    hub = tmp_path / "hub" / "main"
    hub.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(records[:5]), hub / "test-00000-of-00001.parquet")
    out = convert_gsm8k([hub / "test-00000-of-00001.parquet"], tmp_path / "o")
    assert "test" in out and pq.ParquetFile(out["test"]).metadata.num_rows == 5
    saved = tmp_path / "saved"
    saved.mkdir()
    table = pa.Table.from_pylist(records[:3])
    with pa.OSFile(str(saved / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (saved / "dataset_info.json").write_text("{}")
    out = convert_gsm8k([saved], tmp_path / "o2", split="train")
    assert pq.ParquetFile(out["train"]).metadata.num_rows == 3


def test_gsm8k_bad_rows_name_file_row_column(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 4"}\n{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(UserError, match=r"bad.jsonl: row 1: column 'answer'"):
        convert_gsm8k([bad], tmp_path / "o")
    bad.write_text('{"question": 3, "answer": "#### 4"}\n')
    with pytest.raises(UserError, match=r"row 0: column 'question' missing or not a string"):
        convert_gsm8k([bad], tmp_path / "o")


def test_gsm8k_ground_truth():
    assert gsm8k_ground_truth("a\n#### 1,234") == "1234"
    assert gsm8k_ground_truth("#### -3.5") == "-3.5"


def test_load_prompts_applies_the_chat_template(tmp_path, tokenizer):
    paths = convert_gsm8k([SAMPLE], tmp_path)
    records = load_prompts([paths["train"]], tokenizer, max_prompt_length=512)
    assert len(records) == 20
    text = tokenizer.decode(records[0].input_ids)
    assert text.startswith("<|im_start|>user\nMina has 12 apples.") and text.endswith("<|im_start|>assistant\n")
    assert records[0].ground_truth == "15" and records[0].data_source == "openai/gsm8k"


def test_prompts_with_characters_the_tokenizer_cannot_represent_are_counted(tmp_path, tokenizer, caplog):
    from ascend_rl.data.tasks import make_row, write_rows

    rows = [make_row("arithmetic", q, "1", "1", "train", i) for i, q in enumerate(["1+0=", "½+½=", "1+0=", "π≈"])]
    path = write_rows(rows, tmp_path / "odd.parquet")
    with caplog.at_level("WARNING", logger="ascend_rl"):
        records = load_prompts([path], tokenizer, max_prompt_length=64)
    assert len(records) == 4
    assert f"{path}: 2 of 4 prompts contain characters the tokenizer maps to its unknown token '<unk>' " \
           "(first: prompt 1)" in caplog.text


def test_chat_template_kwargs_pass_through(tmp_path, tokenizer):
    paths = convert_gsm8k([SAMPLE], tmp_path)
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = "{% if shout %}!{% endif %}{{ messages[0]['content'][:3] }}"
    (record, *_) = load_prompts([paths["train"]], tokenizer, 64, chat_template_kwargs={"shout": True})
    assert tokenizer.decode(record.input_ids) == "!Min"


@pytest.mark.parametrize("mode,expected", [("left", [3, 4, 5]), ("right", [0, 1, 2]), ("middle", [0, 4, 5])])
def test_truncate(mode, expected):
    assert truncate([0, 1, 2, 3, 4, 5], 3, mode) == expected
    assert truncate([0, 1], 3, mode) == [0, 1]


def test_overlong_prompts_filtered_truncated_or_rejected(tmp_path, tokenizer):
    paths = convert_gsm8k([SAMPLE], tmp_path)
    lengths = [len(r.input_ids) for r in load_prompts([paths["train"]], tokenizer, 10_000)]
    limit = sorted(lengths)[10]
    kept = load_prompts([paths["train"]], tokenizer, limit, filter_overlong_prompts=True)
    assert len(kept) == sum(n <= limit for n in lengths)
    cut = load_prompts([paths["train"]], tokenizer, limit, truncation="left")
    assert len(cut) == 20 and max(len(r.input_ids) for r in cut) == limit
    assert tokenizer.decode(cut[lengths.index(max(lengths))].input_ids).endswith("assistant\n")
    with pytest.raises(DataError, match=rf"train.parquet: row \d+: prompt has \d+ tokens > data.max_prompt_length={limit}"):
        load_prompts([paths["train"]], tokenizer, limit, truncation="error")
    with pytest.raises(DataError, match="no prompts left"):
        load_prompts([paths["train"]], tokenizer, 5, filter_overlong_prompts=True)


def test_max_samples(tmp_path, tokenizer):
    paths = convert_gsm8k([SAMPLE], tmp_path)
    assert len(load_prompts([paths["train"]], tokenizer, 512, max_samples=7)) == 7


def _write(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


GOOD = {"data_source": "arithmetic", "prompt": [{"role": "user", "content": "1+1="}],
        "reward_model": {"style": "rule", "ground_truth": "2"}}


@pytest.mark.parametrize("rows,message", [
    ([{k: v for k, v in GOOD.items() if k != "reward_model"}], "missing column 'reward_model'"),
    ([GOOD, {**GOOD, "prompt": []}], "row 1: column 'prompt' must be a non-empty list"),
    ([{**GOOD, "data_source": 5}], "row 0: column 'data_source' must be a string"),
    ([{**GOOD, "reward_model": {"style": "rule"}}], "row 0: column 'reward_model' must be a struct"),
])
def test_malformed_parquet_names_file_row_column(tmp_path, tokenizer, rows, message):
    path = _write(tmp_path / "d.parquet", rows)
    with pytest.raises(DataError, match=f"d.parquet: {message}"):
        load_prompts([path], tokenizer, 64)


def test_unreadable_and_empty_files(tmp_path, tokenizer):
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(DataError, match="junk.parquet: not a readable parquet file"):
        load_prompts([junk], tokenizer, 64)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD]).slice(0, 0), empty)
    with pytest.raises(DataError, match="empty.parquet: no rows"):
        load_prompts([empty], tokenizer, 64)
    with pytest.raises(DataError, match="absent.parquet: no such file"):
        load_prompts([tmp_path / "absent.parquet"], tokenizer, 64)


def test_sampler_resumes_mid_epoch_exactly():
    straight = ResumableBatchSampler(10, 3, seed=7)
    expected = [straight.next_batch() for _ in range(7)]  # crosses two epoch boundaries
    first = ResumableBatchSampler(10, 3, seed=7)
    got = [first.next_batch() for _ in range(4)]
    resumed = ResumableBatchSampler(10, 3, seed=7)
    resumed.load_state_dict(first.state_dict())
    got += [resumed.next_batch() for _ in range(3)]
    assert got == expected
    assert expected[0] != expected[3]  # a new epoch reshuffles
    assert all(len(b) == 3 for b in expected)
    assert len(set(sum(expected[:3], []))) == 9  # no repeats within an epoch


def test_sampler_state_from_other_data_is_rejected():
    with pytest.raises(ValueError, match="sampler state is for 10 samples"):
        ResumableBatchSampler(11, 3).load_state_dict(ResumableBatchSampler(10, 3).state_dict())


def test_sampler_without_shuffle_and_too_little_data():
    assert ResumableBatchSampler(5, 2, shuffle=False).next_batch() == [0, 1]
    with pytest.raises(ValueError, match="cannot fill one batch"):
        ResumableBatchSampler(2, 3)


def test_cli_bad_input_is_one_line_and_nonzero(tmp_path, capsys):
    assert main(["data", "gsm8k", "--input", str(tmp_path / "absent.jsonl"), str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {tmp_path / 'absent.jsonl'}: no such file"]
    assert not (tmp_path / "o").exists()


def test_python_dash_m_is_the_same_entry_point(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "ascend_rl", "data", "arithmetic", str(tmp_path), "--train-size", "4",
                          "--test-size", "2", "--max-operand", "3"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert pq.ParquetFile(tmp_path / "test.parquet").metadata.num_rows == 2
