"""GPT-2 (124M) trainer: a faithful, resumable reproduction of karpathy's build-nanogpt run."""

__version__ = "0.1.0"
