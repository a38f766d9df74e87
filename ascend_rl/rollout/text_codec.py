"""The model's tokenizer as `ascend-rl serve` uses it when it has one (SGLang without --skip-tokenizer-init):
prompts given as text, chat messages through the model's chat template, and outputs detokenized as SGLang's
detokenizer does it.

SGLang's detokenization (srt/managers/detokenizer_manager.py), kept here because clients see it:
- the output is decoded after the last few prompt tokens (`CONTEXT_TOKENS`) and only the new part kept, so a
  first token that opens with a space (SentencePiece) keeps it;
- `skip_special_tokens` and `spaces_between_special_tokens` go to the tokenizer's decode;
- unless `no_stop_trim`, a sample that ended on a stop token loses that token from its text, and one that
  ended on a stop string loses the text from that string on;
- while streaming, text is committed only once it decodes to whole characters, and a stream never takes back
  text it sent.
"""

from __future__ import annotations

from collections.abc import Sequence

from ascend_rl.data.model_dir import load_tokenizer
from ascend_rl.errors import first_line
from ascend_rl.rollout.protocol import GenerateOutput, SamplingParams

CONTEXT_TOKENS = 5  # SGLang's INIT_INCREMENTAL_DETOKENIZATION_OFFSET
INCOMPLETE = "\ufffd"  # what a token that ends inside a UTF-8 character decodes to


class TextCodec:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, path: str, key: str = "--tokenizer-path") -> TextCodec:
        """The tokenizer in `path` (named by the flag `key` in errors), checked as the trainer checks its own."""
        return cls(load_tokenizer(path, key, "pass --tokenizer-path, or serve token ids only with "
                                             "--skip-tokenizer-init"))

    def encode(self, text: str) -> list[int]:
        """As SGLang tokenizes a prompt: the tokenizer's call, with its special tokens (a BOS where it adds one)."""
        return list(self.tokenizer(text)["input_ids"])

    def chat_prompt(self, messages: list[dict], template_kwargs: dict | None = None) -> list[int]:
        """The messages through the model's chat template, ready for the assistant's answer."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("messages: the model's tokenizer has no chat template; send a prompt to /v1/completions")
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False, **(template_kwargs or {}))
        except Exception as err:  # the template's own checks (jinja's raise_exception) refuse these messages
            raise ValueError(f"messages: the chat template refused them: {first_line(err)}") from None
        return list(ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True,
               spaces_between_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens,
                                     spaces_between_special_tokens=spaces_between_special_tokens)

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each token alone, special tokens included (SGLang's text in log-prob entries)."""
        return [self.tokenizer.decode([token], skip_special_tokens=False) for token in ids]


class SampleText:
    """One sample's text, updated with each snapshot of its output (SGLang's incremental detokenization)."""

    def __init__(self, codec: TextCodec, prompt: Sequence[int], params: SamplingParams):
        self.codec, self.params = codec, params
        self.context = list(prompt[-CONTEXT_TOKENS:])
        self.surr, self.read = 0, len(self.context)  # decoded text covers ids[:read]; ids[surr:read] re-decoded
        self.decoded = ""  # committed: whole characters only
        self.sent = ""

    def update(self, out: GenerateOutput) -> str:
        """The text so far (the whole text once `out` is finished)."""
        ids = self.context + text_ids(out, self.params)
        before = self._decode(ids[self.surr:self.read])
        new = self._decode(ids[self.surr:])[len(before):]
        if out.finish_reason is None:
            if new and not new.endswith(INCOMPLETE):
                self.decoded, new = self.decoded + new, ""
                self.surr, self.read = self.read, len(ids)
            else:  # a character still incomplete: hold it back
                new = new.rstrip(INCOMPLETE)
        self.sent += trim_stop(self.decoded + new, out, self.params)[len(self.sent):]
        return self.sent

    def _decode(self, ids: list[int]) -> str:
        return self.codec.decode(ids, self.params.skip_special_tokens, self.params.spaces_between_special_tokens)


def text_ids(out: GenerateOutput, params: SamplingParams) -> list[int]:
    """The ids a sample's text is decoded from: without the stop token that ended it, unless no_stop_trim."""
    if out.finish_reason == "stop" and isinstance(out.matched, int) and not params.no_stop_trim and out.output_ids:
        return out.output_ids[:-1]
    return out.output_ids


def trim_stop(text: str, out: GenerateOutput, params: SamplingParams) -> str:
    """The text up to the stop string that ended the sample, unless no_stop_trim."""
    if out.finish_reason == "stop" and isinstance(out.matched, str) and not params.no_stop_trim:
        cut = text.find(out.matched)
        return text[:cut] if cut != -1 else text
    return text


def output_text(codec: TextCodec, prompt: Sequence[int], out: GenerateOutput, params: SamplingParams) -> str:
    """A finished sample's text."""
    return SampleText(codec, prompt, params).update(out)
