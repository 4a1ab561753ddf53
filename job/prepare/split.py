"""How many tokens go to the val shard.

The val shard is the first shard, as in build-nanogpt. Its size follows the corpus:

    val = min(shard_size, VAL_MAX, max(VAL_MIN, total // VAL_SHARE))

A corpus of ten shards or more gets a full val shard of `shard_size` tokens: fineweb.py's layout, so FineWeb-Edu
10BT at the default 100M-token shards gives the same 100M val shard and the same bytes. A smaller corpus gives a
tenth of itself to val, but no less than VAL_MIN tokens, so that the val loss still averages over enough text to
compare one evaluation with the next; the rest is train. Because of that floor, any --shard-size up to VAL_MIN is
laid out exactly as fineweb.py would (every shard, val included, `shard_size` tokens). A corpus that the val shard
would take whole leaves nothing to train on: that is a user error (too_small).

While the total is unknown the rule waits: after `decided_after(shard_size)` tokens val is min(shard_size, VAL_MAX)
whatever follows. At the default shard size that is a billion tokens; with --shard-size up to VAL_MIN, none; for a
source known to be that large (a FineWeb-edu subset streamed from the hub: Source.large), none either. Until then the
pipeline does not hold the tokens back: it commits them as staged shards of shard_size tokens, and cuts the final
shards from them once the rule is decided (a staged shard is a final one as it is when val is a full shard).
"""

from __future__ import annotations

from job.errors import UserError

VAL_SHARE = 10  # the val shard takes 1/VAL_SHARE of the corpus...
VAL_MIN = 100_000  # ...but at least this many tokens (or --shard-size, if smaller)...
VAL_MAX = 100_000_000  # ...and at most build-nanogpt's val shard


def val_size(total: int, shard_size: int) -> int:
    """Tokens of the val shard for a corpus of `total` tokens cut into shards of `shard_size`."""
    return min(shard_size, VAL_MAX, max(VAL_MIN, total // VAL_SHARE))


def decided_after(shard_size: int) -> int:
    """Tokens from which on val_size no longer depends on the total (0: it never does)."""
    cap = min(shard_size, VAL_MAX)
    return 0 if cap <= VAL_MIN else VAL_SHARE * cap


def too_small(label: str, total: int, val: int) -> UserError:
    """The error for a corpus whose val shard (of `val` tokens) would take every token, leaving none to train on."""
    return UserError(f"{label} has {total:,} tokens, too few to split into val and train: the val shard takes {val:,}, so it "
                     f"needs more than {val:,}; add text, or pass a --shard-size below {total:,} (val is at most one shard)")


def describe(val: int, total: int | None) -> str:
    """The split, for the log: how much went to val, out of what."""
    if total is None:
        return f"val split: the first {val:,} tokens, a full shard (the corpus has at least {VAL_SHARE * val:,})"
    return f"val split: the first {val:,} of {total:,} tokens ({val / total:.1%}); train: the other {total - val:,}"
