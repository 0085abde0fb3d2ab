"""Rollout math: SDE/ODE steps with exact per-step log-probs, model-agnostic."""
