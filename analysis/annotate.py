"""Annotated rollouts that say what happened, for `thinktok sample --task` and every training samples page
(rl/logs.py): per rollout the answer, the gold answer and whether it is right, the reward and each term,
its group (the rollouts of one prompt) and group advantage; per step its log-prob and probability (from
analysis/render.py); and for each thinking token what it most often stands for, read from a code table of
the checkpoint's own greedy thoughts on validation problems (analysis/content.py's), e.g. `<think3>=7`
with its purity. analysis/render.py draws the records as text, HTML (filterable, sortable) or JSONL."""

from __future__ import annotations

from collections import Counter, defaultdict

import torch

from thinktok.models.thoughts import ThoughtMode
from thinktok.rl.advantages import group_advantages
from thinktok.rl.rewards import RewardConfig, RewardModel

from .content import ContentConfig, answer_text, candidates, code_table, thought_symbols
from .evaluate import decode
from .render import to_json

CODE_EXAMPLES = 200  # validation problems whose greedy thoughts make the code table


def token_codes(rows: list[dict], symbols: list[list[str]], best_per_position: list[dict]) -> dict:
    """Thinking-token symbol -> what it most often stands for: over its uses at positions whose best
    candidate (the value the code table finds the position most informative of) is known, that
    candidate's most common value, its share of the uses (purity), the use count, and the position's NMI
    beside its chance level (a value at chance NMI is a coincidence, not a code)."""
    best = {p["position"]: p for p in best_per_position}
    uses: dict[str, list] = defaultdict(list)  # symbol -> [(value, position)]
    for row, syms in zip(rows, symbols):
        values = candidates(row)
        for k, s in enumerate(syms):
            if k in best and best[k]["candidate"] in values and not s.startswith("~"):
                uses[s].append((values[best[k]["candidate"]], k))
    out = {}
    for s, found in uses.items():
        (value, count), = Counter(v for v, _ in found).most_common(1)
        k = Counter(k for _, k in found).most_common(1)[0][0]  # the position it is used at most
        out[s] = {"value": value, "purity": count / len(found), "n": len(found),
                  "candidate": best[k]["candidate"], "nmi": best[k]["nmi"], "chance": best[k]["chance"]}
    return out


@torch.no_grad()
def checkpoint_codes(policy, greedy: ThoughtMode, task, limit: int = CODE_EXAMPLES) -> dict:
    """`token_codes` of the policy's thoughts under `greedy` (its mode with greedy sampling) on the first
    `limit` validation problems ({} without thinking tokens, or for a task whose rows carry no steps)."""
    if not policy.vocab.num_thinking:
        return {}
    rows = list(task.dataset["validation"])[:limit]
    if not any(row.get("steps") for row in rows):
        return {}
    _, rollouts = decode(policy, lambda lo, hi: greedy, task, rows, batch_size=64)
    embed = policy.model.get_input_embeddings()
    symbols = thought_symbols(rollouts, greedy, policy.tokenizer, embed)
    table = code_table(rows, symbols, ContentConfig(), min_n=min(20, len(rows)))
    return token_codes(rows, symbols, table["best_per_position"])


def reward_model(cfg: RewardConfig, policy, mode: ThoughtMode, task) -> RewardModel | None:
    """The run's rewards scored in this process, or None when they need a teacher (a page then shows
    correctness without a reward)."""
    if {"teacher_loglik", "teacher_kl"} & set(cfg.weights):
        return None
    return RewardModel(cfg, task=task, tokenizer=policy.tokenizer, policy=policy.model, mode=mode)


def annotate(rollouts: list, rows: list[dict], group: int, policy, task, scorer: RewardModel | None,
             codes: dict, algo: str = "grpo") -> list[dict]:
    """Records of `rollouts` (each prompt's `group` samples in a row, rows[i] the problem of rollouts[i]):
    render's record plus answer, gold, correct, group, and with a scorer reward, terms and (grpo, rloo)
    the group advantage the learner would compute; every thinking-token step whose symbol has a code gets
    it as `code`."""
    tok, embed = policy.tokenizer, policy.model.get_input_embeddings().weight
    scored = scorer.score(rollouts, rows) if scorer is not None else None
    grouped = scored is not None and group > 1 and algo in ("grpo", "rloo")  # ppo's come from its critic
    advantages = group_advantages(scored.total, group, algo) if grouped else None
    out = []
    for i, (r, row) in enumerate(zip(rollouts, rows)):
        rec = to_json(r, tok, embed)
        answer = answer_text(r, tok)
        rec.update(answer=answer, gold=row["answer"], correct=bool(task.check(answer, row)), group=i // group)
        if scored is not None:
            rec.update(reward=float(scored.total[i]), terms={k: float(v[i]) for k, v in scored.parts.items()})
            if advantages is not None:
                rec["advantage"] = float(advantages[i])
        for step in rec["steps"]:
            if step["kind"] == "thought" and step["text"] in codes:
                step["code"] = codes[step["text"]]
        out.append(rec)
    return out
