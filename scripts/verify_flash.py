"""Cause checks for the flash-attention known issues, a pytest plugin (PYTHONPATH=scripts pytest -p verify_flash ...,
LLMOPT_VERIFY=gpt2 or gptneo): it mends the suspected line, so the checks that failed should pass if the cause is right."""
import os

which = os.environ.get("LLMOPT_VERIFY", "")
if which == "gpt2":  # 4.52-4.57: is_causal=False whenever a mask is given; let flash attention use module.is_causal
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["flash_attention_2"]

    def flash(module, query, key, value, attention_mask, **kwargs):
        kwargs.pop("is_causal", None)
        return original(module, query, key, value, attention_mask, **kwargs)

    ALL_ATTENTION_FUNCTIONS._global_mapping["flash_attention_2"] = flash
elif which == "gptneo":  # hand the local layers' window to flash attention
    from transformers.models.gpt_neo import modeling_gpt_neo as neo

    forward, call, state = neo.GPTNeoFlashAttention2.forward, neo._flash_attention_forward, {}

    def patched_forward(self, *args, **kwargs):
        state["window"] = self.config.window_size if self.attention_type == "local" else None
        return forward(self, *args, **kwargs)

    def patched_call(*args, **kwargs):
        if state.get("window"):
            kwargs["sliding_window"] = state["window"]
        return call(*args, **kwargs)

    neo.GPTNeoFlashAttention2.forward, neo._flash_attention_forward = patched_forward, patched_call
