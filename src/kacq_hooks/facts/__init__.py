"""Fact tracking (Chang et al. 2024): data, injection, per-probe scoring, acquisition and forgetting metrics."""
