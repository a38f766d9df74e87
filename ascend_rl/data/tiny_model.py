"""A tiny Qwen3-architecture model and a character-level tokenizer with a Qwen-style chat template,
saved as an ordinary Hugging Face directory (AutoModelForCausalLM / AutoTokenizer load it offline).

It stands in for a real checkpoint everywhere a hub download is impossible: tests, CI, the embedded
default run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ascend_rl.files import new_dir

PAD, IM_START, IM_END, UNK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"
CHARS = [chr(i) for i in range(32, 127)] + ["\n"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyModelSpec:
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 512
    seed: int = 0
    num_experts: int = 0  # > 0: a Qwen3-MoE (every layer's MLP is experts), e.g. a twin of Qwen3-30B-A3B
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 64


def build_tokenizer():
    """Character-level fast tokenizer: one id per printable ASCII character, plus Qwen's specials."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([PAD, IM_START, IM_END, UNK, *CHARS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([PAD, IM_START, IM_END])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=IM_END, pad_token=PAD, unk_token=UNK, padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(out_dir: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write a randomly initialised tiny Qwen3 model and its tokenizer to `out_dir`, a new directory."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config, Qwen3MoeConfig

    out = Path(out_dir)
    tokenizer = build_tokenizer()
    moe = dict(num_experts=spec.num_experts, num_experts_per_tok=spec.num_experts_per_tok,
               moe_intermediate_size=spec.moe_intermediate_size, norm_topk_prob=True)
    config = (Qwen3MoeConfig if spec.num_experts else Qwen3Config)(
        **(moe if spec.num_experts else {}),
        vocab_size=_round_up(len(tokenizer), 64),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.hidden_size // spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, tokenizer.pad_token_id], pad_token_id=tokenizer.pad_token_id,
    )
    with new_dir(out, "ascend-rl data tiny-model") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
