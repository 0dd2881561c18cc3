"""SGLang integration: the `sparrow` block-sparse attention backend plugin, server launcher and rollout client.

Nothing here imports SGLang at package import time; `plugin.register` is SGLang's entry point
(`sglang.srt.plugins`) and runs in every SGLang process.
"""
