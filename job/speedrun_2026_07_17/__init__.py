"""A port of modded-nanogpt's record of 2026-07-17 (track 1, "MLP down projection in FP8"): its parts, one module each."""
