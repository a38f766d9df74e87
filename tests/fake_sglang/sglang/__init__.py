"""A stand-in for SGLang 0.5.8 in tests (this machine cannot run SGLang): its ServerArgs has 0.5.8's real
field names, its Engine and server answer with SGLang's documented shapes and generate with our native
engine. It tests our side of the contract, not SGLang."""

from sglang.srt.server_args import ServerArgs

__version__ = "0.5.8"

CALLS = []  # (method, summary) of every Engine call, for tests to inspect


class Engine:
    def __init__(self, **kwargs):
        from ascend_rl.rollout.native import NativeEngine

        self.server_args = ServerArgs(**kwargs)  # TypeError on unknown keys, like SGLang
        self.native = NativeEngine.from_pretrained(kwargs["model_path"], "cpu")
        CALLS.append(("__init__", sorted(kwargs)))

    def generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob=False, **_):
        from ascend_rl.rollout.generate_json import LogprobView, output_json
        from ascend_rl.rollout.protocol import SamplingParams

        params = [SamplingParams.from_dict(p) for p in sampling_params]
        CALLS.append(("generate", len(input_ids)))
        outs = self.native.generate(input_ids, params, return_logprob=return_logprob)
        return [output_json(o, str(i), "default", LogprobView(return_logprob)) for i, o in enumerate(outs)]

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        CALLS.append(("update_weights_from_tensor", len(named_tensors)))
        self.native.update_weights_from_tensor(named_tensors)
        return True, "Succeeded to update model weights."

    def release_memory_occupation(self, tags=None):
        CALLS.append(("release_memory_occupation", tags))
        self.native.release_memory_occupation(tags)

    def resume_memory_occupation(self, tags=None):
        CALLS.append(("resume_memory_occupation", tags))
        self.native.resume_memory_occupation(tags)

    def flush_cache(self):
        CALLS.append(("flush_cache", None))
        return type("FlushCacheReqOutput", (), {"success": True})()

    def shutdown(self):
        CALLS.append(("shutdown", None))
