#!/bin/sh
# Files written through the log-dir volume must belong to the host user, not root. With `docker run --user
# UID:GID` nothing is to be done. When the container runs as root (the old workflow's plain `docker run`),
# drop to the owner of the mounted log dir before running the command, so checkpoints land as the user's.
# NANOGPT_RUN_AS_ROOT=1 keeps root.
set -eu
if [ "$(id -u)" = 0 ] && [ -z "${NANOGPT_RUN_AS_ROOT:-}" ] && [ -d "${NANOGPT_LOG_DIR:-/nonexistent}" ]; then
  uid=$(stat -c %u "$NANOGPT_LOG_DIR")
  gid=$(stat -c %g "$NANOGPT_LOG_DIR")
  if [ "$uid" != 0 ]; then
    exec setpriv --reuid="$uid" --regid="$gid" --clear-groups -- "$@"
  fi
fi
exec "$@"
