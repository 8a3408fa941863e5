"""One-line notices about a generation that the user should hear of (the stats say the same)."""
from __future__ import annotations

import logging

log = logging.getLogger("duo")


def warn_if_not_speculating(stats, had_draft: bool) -> None:
    """One warning line when speculation fell away (the worker died, hung, failed) or was paused for most
    of the answer (the target alone was faster on this text); the stats say the same."""
    if not had_draft or stats.stop_reason == "interrupted":
        return
    if stats.fallback is not None:
        log.warning("speculation stopped, the rest was decoded by the target alone: %s", stats.fallback)
    elif stats.new_tokens >= 16 and stats.plain_steps > stats.new_tokens / 2:
        log.warning("speculation paused for %d of %d tokens: the target alone was faster on this text",
                    stats.plain_steps, stats.new_tokens)
