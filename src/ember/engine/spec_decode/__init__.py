"""Speculative decoding: proposers draft tokens, the target model verifies them in the step.

- `ngram_proposer.py`: prompt lookup (drafts copied from where the sequence's last tokens
  occurred before, in the prompt or the output)
- `draft_model.py`: a draft model (a smaller one with the target's vocabulary, or the target
  in a cheaper precision) with its own KV cache on the target's blocks, run by the runner
  at the start of the step
- `policy.py`: when to speculate (per-request acceptance, the step's batch size)
- `metrics.py`: the drafted and accepted counts (vLLM's `spec_decode_*` metrics)

The scheduler asks for n-gram drafts (or leaves room for a draft model's) and schedules them
after a sequence's last token (`SchedulerOutput.scheduled_spec_decode_tokens`); the runner
samples every one of those rows (`model_runner.accept_drafts`) and returns the accepted run;
the scheduler rolls back the rest (computed tokens, KV blocks).
"""
