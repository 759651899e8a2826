"""The reference rollouts `test_columns.py` compares against: every mode of `MODE_CASES`, with the full head
and the task head, sampled and recomputed by the sampler as it computed over all 50,273 vocabulary columns
(commit 68a6762, before distributions moved into the head's columns). Regenerate only when a change is
meant to alter what the sampler draws:  python tests/golden.py  (writes tests/data/golden_rollouts.pt)."""

from pathlib import Path

import torch

from conftest import MODE_CASES, make
from thinktok.envs import TaskConfig, load_task
from thinktok.models.head import restrict_head, task_text_ids
from thinktok.rl.recompute import gold_answer_loglik, recompute_logprobs
from thinktok.rl.sampler import sample

PATH = Path(__file__).parent / "data" / "golden_rollouts.pt"
PROMPTS = [[1105, 1635, 4974, 796], [16, 1635, 718, 796], [1105, 1635]]  # task-head ids, different lengths
GOLD = [[718, 50256], [807, 767, 50256], [50256]]
TASK = TaskConfig(name="multiplication", digits=2, spaced=True, reverse=True, num_train=50, num_val=5,
                  num_test=5)
HEADS = ("full", "task")


def build(case: str, head: str):
    policy, mode = make(case, max_new_tokens=5)
    if head == "task":
        ids = task_text_ids(load_task(TASK), policy.tokenizer)
        restrict_head(policy.model, sorted(set(ids) | {t for p in PROMPTS + GOLD for t in p}),
                      policy.vocab.text_size)
    return policy, mode


def record(case: str, head: str) -> dict:
    """Everything the sampler drew and the recompute computed for one (mode, head)."""
    policy, mode = build(case, head)
    rollouts = sample(policy.model, mode, PROMPTS, seed=11)
    rec = recompute_logprobs(policy.model, mode, rollouts, text=True)
    gold = gold_answer_loglik(policy.model, mode, rollouts, GOLD)
    fields = ("action", "token", "logprob", "vector", "soft_ids", "soft_w")
    return {"rollouts": [{f: getattr(r, f) for f in fields} for r in rollouts],
            "logprob": rec.logprob, "entropy": rec.entropy, "gold_loglik": gold,
            "own_text": [t for r in rollouts for t in r.token[r.is_text].tolist()],
            "text_logp_own": rec.text_logp.gather(1, torch.tensor(
                [t for r in rollouts for t in r.token[r.is_text].tolist()])[:, None])[:, 0]}


if __name__ == "__main__":
    torch.set_num_threads(1)
    PATH.parent.mkdir(exist_ok=True)
    torch.save({(case, head): record(case, head) for case in MODE_CASES for head in HEADS}, PATH)
    print(f"wrote {PATH}")
