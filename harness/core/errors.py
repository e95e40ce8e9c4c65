"""User-facing error tree: each error prints as one line and maps to an exit code.

Fatal errors (bad config, unknown name, authentication, an unreachable endpoint) stop the run
at once. The LLM judge and the openai generation backend retry transient faults themselves (rate
limits, timeouts, 5xx) with backoff and raise TransientJudgeError / TransientBackendError only
once their retries are used up.
"""

import difflib


class HarnessError(Exception):
    """Base of every error the CLI reports as one clear line (exit code 2)."""

    exit_code = 2


class ConfigError(HarnessError):
    """A config file, registry entry or command-line value is malformed or unknown."""


class DataError(HarnessError):
    """An input file is missing, unreadable or malformed."""


class WeightsError(HarnessError):
    """Model weights cannot be found, fetched or verified."""


class JudgeError(HarnessError):
    """A judge failed in a way that retrying will not fix (auth, bad request, bad reply)."""


class TransientJudgeError(JudgeError):
    """A judge call kept failing in a way a later retry may fix (rate limit, 5xx, timeout)."""


class BackendError(HarnessError):
    """A generation backend failed in a way retrying will not fix (auth, bad request, an
    unreachable server, a missing package or device)."""


class TransientBackendError(BackendError):
    """A generation server kept failing in a way a later retry may fix (rate limit, 5xx,
    timeout) after its retries were used up."""


def unknown_name(kind: str, name: str, known: list[str], hint: str = "") -> ConfigError:
    """A one-line error for an unknown name that suggests the nearest known ones."""
    near = difflib.get_close_matches(name, known, n=3, cutoff=0.4)
    tail = f"did you mean {', '.join(near)}?" if near else f"known: {', '.join(known)}"
    return ConfigError(f"unknown {kind} '{name}'; {tail}{hint}")
