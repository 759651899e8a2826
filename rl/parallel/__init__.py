"""The parallel-thought path (`rollout: parallel`, Quiet-STaR): a thought at every position of a window, all
sampled at once through the fused kernel, each rewarded by how much it raises the next tokens' log-prob.

  config.py   ParallelConfig (light: checkpoints and configs read it without importing the kernel)
  rollout.py  the sampler (incremental form) and the task's text windows
  scorer.py   scoring (thought log-probs, post/pre-thought predictions, gains), advantages, held-out eval
  actors.py   the Ray rollout and scoring workers
  learner.py  the collector (stages 1-3 of rl_step) and the GRPO trainer subclass

Importing this package does not import Triton; rollout.py, scorer.py and what imports them do (through
models/parallel_gpt2.py), so only the parallel path pays for the kernel.
"""
