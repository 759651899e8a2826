"""What runs are measured and shown with: evaluation and its controls, the start/end summary and comparison of
runs, the pre-training signal check, annotated rendering of rollouts, and the benchmarks."""
