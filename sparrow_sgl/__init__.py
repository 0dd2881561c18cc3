"""sparrow-sgl: sparse rollouts for stable and efficient long-context RL of LLMs."""

__version__ = "0.1.0"
