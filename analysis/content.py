"""What the thoughts carry, beyond whether they help (the controls): measures that would catch thinking
tokens that do nothing (a near-constant prefix, thoughts nothing reads), run by `thinktok eval` and in every
study arm on the first `limit` examples of the split.

  interventions  for each thought position k, the k-th thought replaced (another thinking token, drawn
                 uniformly from the other N-1; in vector modes another example's k-th vector) and the rest
                 re-decoded greedily: how often the answer changes and the accuracy drop. A thought nothing
                 reads shows 0 at every k.
  code table     for tasks whose rows carry `steps`: the normalised mutual information (NMI, arithmetic
                 mean of the entropies) between the thought at each position and each character of each step
                 and of the answer, beside its chance level (the same with the examples' values permuted)
                 and its purity (the share of examples whose value is the most common one for their
                 thought). The supervised curriculum should recover the code it was given.
  embedding      for the most used thinking tokens: the nearest text tokens of the embedding row (cosine),
                 the logit lens (the text tokens the head ranks highest where the thought is fed, averaged
                 over its uses) and the row's distance from its initial value.
  pass@k         k in `pass_k` from `samples` decodes per problem at temperature 1 (the unbiased estimator
                 of Chen et al. 2021): RL gains that show at pass@k but not greedily.
  rollouts       the first few examples annotated: thoughts with their ids and nearest text tokens, answer,
                 gold, right or wrong.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from thinktok.errors import UserError
from thinktok.models.thought_modes import with_sampling
from thinktok.models.thoughts import StepOut, ThoughtMode
from thinktok.models.vocab import row_movement
from thinktok.rl.recompute import step_inputs
from thinktok.rl.rollout import Rollout
from thinktok.rl.sampler import sample

from .controls import ModeWrapper, is_thought_input
from .render import nearest_tokens, step_records


@dataclass
class ContentConfig:
    enabled: bool = True  # run the content measures with every evaluation
    limit: int = 200  # first N examples of the evaluated split the measures use
    max_positions: int = 16  # thought positions intervened on and tabulated
    samples: int = 16  # decodes per problem at temperature 1 for pass@k
    pass_k: list[int] = field(default_factory=lambda: [1, 4, 16])  # each <= samples
    top_tokens: int = 8  # thinking tokens in the embedding view (the most used)
    top_pairs: int = 10  # best (position, candidate) pairs of the code table kept
    rollouts: int = 12  # annotated examples kept
    seed: int = 0  # replacement tokens, donors, permutations and pass@k samples

    def validate(self) -> None:
        if self.limit < 1 or self.samples < 1 or self.max_positions < 0:
            raise UserError("content: limit and samples must be >= 1, max_positions >= 0")
        if any(k < 1 or k > self.samples for k in self.pass_k):
            raise UserError(f"content.pass_k {self.pass_k}: each k must be in 1..samples ({self.samples})")


class Intervene(ModeWrapper):
    """Runs `inner` but feeds `replacement[b]` as row b's k-th thought input, for rows with `active[b]`;
    every other step (later thoughts included) is the policy's own."""

    counter = "thoughts_fed"

    def __init__(self, inner: ThoughtMode, k: int, replacement: torch.Tensor, active: torch.Tensor):
        super().__init__(inner)
        self.k, self.replacement, self.active = k, replacement, active  # (B, D), (B,)

    def step(self, logits, hidden, state, embed: nn.Embedding) -> StepOut:
        out = self.inner.step(logits, hidden, state, embed)
        thought = is_thought_input(out, self.inner)
        seen = state.extra["thoughts_fed"]
        hit = thought & (seen == self.k) & self.active
        out.embeds = torch.where(hit[:, None], self.replacement.to(out.embeds.dtype), out.embeds)
        state.extra["thoughts_fed"] = seen + thought
        return out


def thought_steps(r: Rollout, mode: ThoughtMode) -> torch.Tensor:
    """Step indices of a rollout's thoughts (thinking tokens chosen or inserted, vectors, mixtures)."""
    return is_thought_input(StepOut(r.action, r.token, None, None), mode).nonzero()[:, 0]


def answer_text(r: Rollout, tokenizer) -> str:
    return tokenizer.decode(r.text_ids, skip_special_tokens=True)


def replacements(rollouts: list[Rollout], mode: ThoughtMode, embed: nn.Embedding, k: int,
                 gen: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Row b's replacement for its k-th thought -> (B, D) inputs and (B,) bool active. A thinking token
    becomes another thinking token, uniform over the other N-1 (none exists for N = 1: inactive); a vector
    or mixture becomes the next row's k-th (cyclically over the rows that have one; inactive alone)."""
    v, device = mode.vocab, embed.weight.device
    repl = torch.zeros(len(rollouts), embed.weight.shape[1], device=device)
    active = torch.zeros(len(rollouts), dtype=torch.bool, device=device)
    vectors = []  # (row, its k-th thought input) of vector/mixture thoughts
    for b, r in enumerate(rollouts):
        steps = thought_steps(r, mode)
        if len(steps) <= k:
            continue
        s = int(steps[k])
        token = int(r.token[s])
        if token >= 0:
            if v.num_thinking >= 2:
                i = token - v.think_start
                other = v.think_start + (i + gen.randrange(1, v.num_thinking)) % v.num_thinking
                repl[b], active[b] = embed.weight[other].detach(), True
        else:
            vectors.append((b, step_inputs(r, embed)[s].detach()))
    if len(vectors) >= 2:
        for (b, _), (_, donor) in zip(vectors, vectors[1:] + vectors[:1]):
            repl[b], active[b] = donor, True
    return repl, active


def interventions(model, mode: ThoughtMode, task, tokenizer, rows: list[dict], rollouts: list[Rollout],
                  cfg: ContentConfig, batch_size: int) -> list[dict]:
    """Per thought position k: examples intervened on, how often the answer changed, accuracy before and
    after (on those examples) and the drop in points."""
    embed = model.get_input_embeddings()
    before = [answer_text(r, tokenizer) for r in rollouts]
    most = max([len(thought_steps(r, mode)) for r in rollouts] + [0])
    gen, out = random.Random(cfg.seed), []
    for k in range(min(most, cfg.max_positions)):
        repl, active = replacements(rollouts, mode, embed, k, gen)
        idx = active.nonzero()[:, 0].tolist()
        entry = {"position": k, "n": len(idx)}
        if idx:
            changed = right = right_after = 0
            for lo in range(0, len(idx), batch_size):
                chunk = idx[lo : lo + batch_size]
                hit = Intervene(mode, k, repl[chunk], active[chunk])
                new = sample(model, hit, [rollouts[i].prompt_ids for i in chunk])
                for i, r in zip(chunk, new):
                    after = answer_text(r, tokenizer)
                    changed += after != before[i]
                    right += task.check(before[i], rows[i])
                    right_after += task.check(after, rows[i])
            n = len(idx)
            entry.update(changed=changed / n, accuracy=right / n, accuracy_intervened=right_after / n,
                         drop_points=100 * (right - right_after) / n)
        out.append(entry)
    return out


def candidates(row: dict) -> dict[str, str]:
    """The values a thought might encode: every character of every step, and of the answer, as written
    (spaces removed): {"step 1 char 2": "4", ..., "answer char 1": "7"}."""
    out = {}
    for i, step in enumerate(row.get("steps") or []):
        for j, ch in enumerate(str(step).replace(" ", "")):
            out[f"step {i + 1} char {j + 1}"] = ch
    for j, ch in enumerate(str(row["answer"]).replace(" ", "")):
        out[f"answer char {j + 1}"] = ch
    return out


def entropy(counts) -> float:
    n = sum(counts)
    return -sum(c / n * math.log(c / n) for c in counts if c)


def nmi(xs: list, ys: list) -> tuple[float, float]:
    """Normalised mutual information I(X;Y) / ((H(X) + H(Y)) / 2), 0 when either is constant, and the purity
    sum_x max_y n(x, y) / n (how well X determines Y)."""
    n = len(xs)
    joint = Counter(zip(xs, ys))
    hx, hy = entropy(Counter(xs).values()), entropy(Counter(ys).values())
    mi = hx + hy - entropy(joint.values())
    best: dict = {}
    for (x, _), c in joint.items():
        best[x] = max(best.get(x, 0), c)
    return (max(mi, 0.0) / ((hx + hy) / 2) if hx > 0 and hy > 0 else 0.0), sum(best.values()) / n


def thought_symbols(rollouts: list[Rollout], mode: ThoughtMode, tokenizer, embed: nn.Embedding) -> list:
    """Per rollout, one symbol per thought: the thinking token (`<think7>`) or, for a vector or mixture, its
    nearest text token (`~the`)."""
    out = []
    for r in rollouts:
        steps = thought_steps(r, mode)
        inputs = step_inputs(r, embed)[steps.to(embed.weight.device)].detach()
        near = nearest_tokens(inputs, embed.weight.detach(), mode.vocab.text_size, k=1)[:, 0].tolist()
        out.append([tokenizer.decode([int(r.token[s])]) if r.token[s] >= 0 else f"~{tokenizer.decode([t])}"
                    for s, t in zip(steps.tolist(), near)])
    return out


def code_table(rows: list[dict], symbols: list[list[str]], cfg: ContentConfig, min_n: int = 20) -> dict:
    """NMI between the thought at each position and each candidate value (analysis of `candidates`), on the
    examples that have both; with its chance level (mean NMI over 3 permutations of the values). Returns the
    best candidate per position and the `top_pairs` pairs with the largest NMI above chance."""
    gen = random.Random(cfg.seed)
    cands = [candidates(row) for row in rows]
    names = list(dict.fromkeys(name for c in cands for name in c))
    most = max([len(s) for s in symbols] + [0])
    pairs = []
    for k in range(min(most, cfg.max_positions)):
        for name in names:
            have = [i for i, (s, c) in enumerate(zip(symbols, cands)) if len(s) > k and name in c]
            if len(have) < min_n:
                continue
            xs, ys = [symbols[i][k] for i in have], [cands[i][name] for i in have]
            score, purity = nmi(xs, ys)
            chance = sum(nmi(xs, gen.sample(ys, len(ys)))[0] for _ in range(3)) / 3
            common = Counter(xs).most_common(1)[0]
            pairs.append({"position": k, "candidate": name, "nmi": score, "chance": chance, "purity": purity,
                          "n": len(have), "top_symbol": common[0], "top_share": common[1] / len(have)})
    per_position = {}
    for p in pairs:
        if p["position"] not in per_position or p["nmi"] > per_position[p["position"]]["nmi"]:
            per_position[p["position"]] = p
    top = sorted(pairs, key=lambda p: p["nmi"] - p["chance"], reverse=True)[: cfg.top_pairs]
    return {"best_per_position": [per_position[k] for k in sorted(per_position)], "top_pairs": top}


def describe(pair: dict) -> str:
    """`position 2: <think7>-coded step 2 char 1, NMI 0.94 (chance 0.02), purity 0.97, n 200`."""
    return (f"position {pair['position']} ~ {pair['candidate']}: NMI {pair['nmi']:.2f} (chance "
            f"{pair['chance']:.2f}), purity {pair['purity']:.2f}, n {pair['n']}")


def hidden_after(model, rollouts: list[Rollout]) -> list[torch.Tensor]:
    """Per rollout, the last hidden state at the position where each step is fed: (S, D)."""
    embed = model.get_input_embeddings()
    device = embed.weight.device
    seqs = [torch.cat([embed(torch.tensor(r.prompt_ids, device=device)), step_inputs(r, embed)])
            for r in rollouts]
    mask = pad_sequence([torch.ones(len(s), dtype=torch.long, device=device) for s in seqs], batch_first=True)
    hidden = model.base_model(inputs_embeds=pad_sequence(seqs, batch_first=True),
                              attention_mask=mask).last_hidden_state  # (B, W, D), right-padded
    return [hidden[b, len(r.prompt_ids) : len(r.prompt_ids) + r.num_steps] for b, r in enumerate(rollouts)]


def embedding_view(policy, mode: ThoughtMode, rollouts: list[Rollout], cfg: ContentConfig,
                   batch_size: int) -> list[dict]:
    """For the `top_tokens` most used thinking tokens: uses, nearest text tokens of the row, logit lens at its
    uses, distance from init."""
    v, model, tok = policy.vocab, policy.model, policy.tokenizer
    if not v.num_thinking:
        return []
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    lens = torch.zeros(v.num_thinking, v.text_size)  # summed text log-probs at each token's uses
    uses = torch.zeros(v.num_thinking, dtype=torch.long)
    for lo in range(0, len(rollouts), batch_size):
        chunk = rollouts[lo : lo + batch_size]
        for r, h in zip(chunk, hidden_after(model, chunk)):
            think = (r.token >= v.think_start) & (r.token < v.think_start + v.num_thinking)
            if think.any():
                ids = r.token[think] - v.think_start
                logp = torch.log_softmax(head(h[think.to(h.device)])[:, : v.text_size].float(), -1).cpu()
                lens.index_add_(0, ids, logp)
                uses += torch.bincount(ids, minlength=v.num_thinking)
    moved = row_movement(model, v, policy.init_rows)
    order = [i for i in uses.argsort(descending=True).tolist() if uses[i] > 0][: cfg.top_tokens]
    if not order:
        return []
    rows = embed.weight[[v.think_id(i) for i in order]].detach()
    near = nearest_tokens(rows, embed.weight.detach(), v.text_size).tolist()

    def words(ids):
        return [tok.decode([t]) for t in ids]

    return [{"token": tok.decode([v.think_id(i)]), "uses": int(uses[i]), "nearest": words(n),
             "logit_lens": words((lens[i] / uses[i]).topk(3).indices.tolist()), "moved": float(moved[i])}
            for i, n in zip(order, near)]


def unbiased_pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k draws without replacement from n samples, c of them right, is right)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_at_k(model, mode: ThoughtMode, task, tokenizer, rows: list[dict], cfg: ContentConfig,
              batch_size: int) -> dict:
    """pass@k for k in cfg.pass_k from cfg.samples decodes per problem at temperature 1 (the mode's own
    noise, top-k/top-p off)."""
    sampling = replace(mode.sampling, greedy=False, temperature=1.0, top_k=0, top_p=1.0)
    sampled = with_sampling(mode, sampling, model.device)
    prompts = [tokenizer(row["prompt"]).input_ids for row in rows for _ in range(cfg.samples)]
    right = []
    for lo in range(0, len(prompts), batch_size):
        out = sample(model, sampled, prompts[lo : lo + batch_size], seed=cfg.seed + lo)
        right += [task.check(answer_text(r, tokenizer), rows[(lo + j) // cfg.samples])
                  for j, r in enumerate(out)]
    per_row = [sum(right[i : i + cfg.samples]) for i in range(0, len(right), cfg.samples)]
    return {f"pass@{k}": sum(unbiased_pass_at_k(cfg.samples, c, k) for c in per_row) / len(per_row)
            for k in cfg.pass_k}


def annotated(policy, task, rows: list[dict], rollouts: list[Rollout], n: int) -> list[dict]:
    """The first n examples for people: prompt, steps (thoughts with ids and nearest text tokens), answer,
    gold, right or wrong, and the exact-match reward (1 right, 0 wrong)."""
    embed = policy.model.get_input_embeddings().weight
    out = []
    for row, r in zip(rows[:n], rollouts[:n]):
        answer = answer_text(r, policy.tokenizer)
        right = bool(task.check(answer, row))
        out.append({"prompt": row["prompt"], "steps": step_records(r, policy.tokenizer, embed),
                    "answer": answer, "gold": row["answer"], "correct": right, "reward": float(right)})
    return out


def content_measures(policy, mode: ThoughtMode, task, rows: list[dict], rollouts: list[Rollout],
                     cfg: ContentConfig, batch_size: int = 64) -> dict:
    """Every measure above on the first cfg.limit rows and their greedy rollouts (from `evaluate_policy`)."""
    rows, rollouts = rows[: cfg.limit], rollouts[: cfg.limit]
    model, tok = policy.model, policy.tokenizer
    embed = model.get_input_embeddings()
    out = {"num_examples": len(rows),
           "interventions": interventions(model, mode, task, tok, rows, rollouts, cfg, batch_size),
           "pass_at_k": pass_at_k(model, mode, task, tok, rows, cfg, batch_size),
           "embedding": embedding_view(policy, mode, rollouts, cfg, batch_size),
           "rollouts": annotated(policy, task, rows, rollouts, cfg.rollouts)}
    if any(row.get("steps") for row in rows):
        out["code_table"] = code_table(rows, thought_symbols(rollouts, mode, tok, embed), cfg)
    return out

