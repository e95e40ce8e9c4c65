"""The rules as a vLLM v1 logits processor (imports vllm: loaded by vLLM's engine, never on CPU).

`RulesAdapter` wraps harness.generate.vllm.RulesRequestProcessor with vLLM's documented
`AdapterLogitsProcessor` (vllm.v1.sample.logits_processor): for each request whose
`SamplingParams.extra_args` carry the rules (key harness.generate.vllm.RULES_ARG) it makes a
per-request callable (prompt_ids, output_ids, logits) -> logits; other requests are untouched.
"""

from __future__ import annotations

from typing import Any

from vllm import SamplingParams
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from harness.generate.vllm import RULES_ARG, RulesRequestProcessor


class RulesAdapter(AdapterLogitsProcessor):
    """The study's rules, per request, inside vLLM's batched sampler."""

    @classmethod
    def validate_params(cls, params: SamplingParams) -> None:
        """Reject malformed rules arguments when a request arrives."""
        args = (params.extra_args or {}).get(RULES_ARG)
        if args is not None and not (isinstance(args, dict) and {
                "config", "token_ids", "weights", "eos_ids"} <= set(args)):
            raise ValueError(f"extra_args[{RULES_ARG!r}] must hold config, token_ids, weights "
                             f"and eos_ids")

    def is_argmax_invariant(self) -> bool:
        """The rules change which token is most likely."""
        return False

    def new_req_logits_processor(self, params: SamplingParams) -> Any:
        """A RulesRequestProcessor for a request that carries rules, else None."""
        args = (params.extra_args or {}).get(RULES_ARG)
        return None if args is None else RulesRequestProcessor.from_args(args)
