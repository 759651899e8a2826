"""Is the logged teacher_kl reward the current policy's? (docs/results.md, "Seed 004 on real text: the
control's budget"). Samples from a run's initial and final policies on 32 training prompts x 4 and scores
teacher_kl with each one's own log-probs and with the initial policy's: a reward read from a stale copy would
match the second number, not the first.

    python docs/studies/text-budget-2026-12-07/check_reward.py RUN_DIR   # a text_kl run with checkpoint-100
"""

import sys

import torch

from thinktok.config import load_config
from thinktok.envs import load_task
from thinktok.models.policy import load_base_tokenizer
from thinktok.models.teacher import Teacher
from thinktok.rl.actors import policy_copy
from thinktok.rl.config import TrainConfig
from thinktok.rl.rewards import RewardConfig, RewardModel
from thinktok.rl.sampler import sample

run = sys.argv[1]
cfg = load_config(TrainConfig, f"{run}/config.yaml")
torch.set_num_threads(1)
final, final_mode = policy_copy(f"{run}/trainer/checkpoint-100", cfg.thought, cfg.sampling, "cpu")
init, init_mode = policy_copy(f"{run}/policy_init", cfg.thought, cfg.sampling, "cpu")
tok = load_base_tokenizer(f"{run}/policy_init")
rows = load_task(cfg.task).dataset["train"].to_list()[:32]
prompts = [tok(r["prompt"]).input_ids for r in rows for _ in range(4)]
teacher = Teacher.load(cfg.teacher, "cpu")
weights = RewardConfig(weights={"teacher_kl": 1.0})
with torch.no_grad():
    for name, model, mode in (("init", init, init_mode), ("final", final, final_mode)):
        rollouts = sample(model, mode, prompts, seed=123)
        own = RewardModel(weights, teacher=teacher, policy=model, mode=mode).score(rollouts)
        by_init = RewardModel(weights, teacher=teacher, policy=init, mode=init_mode).score(rollouts)
        tokens = sum(r.num_text for r in rollouts) / len(rollouts)
        print(f"sampled from {name}: teacher_kl by its own log-probs {own.parts['teacher_kl'].mean():.3f}, "
              f"by the initial policy's {by_init.parts['teacher_kl'].mean():.3f}, text tokens {tokens:.1f}")
