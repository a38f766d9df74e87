"""SGLang as the rollout engine: ServerArgs from the config (per installed version), the in-process Engine,
and a launched `sglang.launch_server` reached over HTTP. SGLang is imported only inside these functions."""
