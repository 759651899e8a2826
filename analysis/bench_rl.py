"""`thinktok bench rl`: the project's RL step against a GRPO step written plainly here, on the same
checkpoint, batch and seed, in one process.

The reference (`Reference`) is what one writes by hand for a vocab-mode policy: KV-cached sampling over the
head's columns, the reward computed directly (exact match, the thought gain of the gold answer, or the
teacher's log-likelihood minus the student's), group-normalised advantages, TRL's dapo surrogate over the
action steps, one backward, clipping, AdamW. Before anything is timed, both are fed the same rollouts (the
project's collector's) and must give the same loss and gradients (to 1e-5): the reference is the same
computation, not a cheaper one. Then each runs `steps` steps after `warm_up`, and the bench prints ms a
step, rollouts/s and the ratio, for the project's step inline and with Ray actors.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import DynamicCache, TrainerCallback

from thinktok.errors import UserError

from .timing import write_json

CONFIGS = ("configs/quickstart.yaml", "configs/rl_discovery.yaml", "configs/text_kl.yaml")


@dataclass
class Setup:
    """What the reference needs to know of a run's config (vocab mode only)."""

    budget: int  # thought steps: at most (free placement) or exactly (slots)
    slots: bool
    max_text: int
    reward: str  # exact_match | thought_gain | teacher_kl
    latent_coef: float
    group: int
    lr: float
    clip: float
    epsilon: float


class Reference:
    """A plain GRPO step for a vocab-mode policy, with the project's distributions written out: a free
    placement step samples text or a thinking token while the thought budget lasts, else text; a fixed slot
    samples the thinking columns alone; text columns exclude thinking tokens; temperature 1."""

    def __init__(self, model, tokenizer, task, vocab, setup: Setup, teacher=None):
        self.model, self.tok, self.task, self.v, self.s = model, tokenizer, task, vocab, setup
        self.teacher = teacher
        head = model.get_output_embeddings()
        self.cols = getattr(head, "allowed", torch.arange(vocab.size))  # (K,) token id of each column
        self.n_text = int((self.cols < vocab.text_size).sum())
        self.opt = torch.optim.AdamW(model.parameters(), lr=setup.lr, weight_decay=0.0)

    def logits(self, h):  # (..., D) -> (..., K): the head's rows only
        return h @ self.model.get_output_embeddings().weight[self.cols].T

    def banned(self, n_thought: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
        """(N,) thoughts so far, (N,) step index -> (N, K) bool: the columns the step may not sample."""
        k = torch.arange(len(self.cols))
        think = (k >= self.n_text) & (k < self.n_text + self.v.num_thinking)
        marker = k >= self.n_text + self.v.num_thinking
        if self.s.slots:
            slot = (step < self.s.budget)[:, None]
            return marker | (think & ~slot) | (~think & slot)
        return marker | (think & (n_thought >= self.s.budget)[:, None])

    @torch.no_grad()
    def sample(self, prompts: list[list[int]], seed: int) -> tuple[list[list[int]], list[list[float]]]:
        """KV-cached sampling -> each rollout's token ids and their log-probs."""
        torch.manual_seed(seed)
        b, width = len(prompts), max(map(len, prompts))
        ids = torch.tensor([[self.v.eos_id] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        cache = DynamicCache()
        h = self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                  use_cache=True).last_hidden_state[:, -1]
        n_thought, n_text = torch.zeros(b, dtype=torch.long), torch.zeros(b, dtype=torch.long)
        alive, toks, lps = [], [], []
        done = torch.zeros(b, dtype=torch.bool)
        for step in range(self.s.max_text + self.s.budget):
            banned = self.banned(n_thought, torch.full((b,), step))
            lp = self.logits(h).float().masked_fill(banned, float("-inf")).log_softmax(-1)
            col = torch.multinomial(lp.exp(), 1)
            tok = self.cols[col[:, 0]]
            alive.append(~done)
            toks.append(tok)
            lps.append(lp.gather(1, col)[:, 0])
            is_text = tok < self.v.text_size
            n_thought += ~is_text
            n_text += is_text
            done = done | (n_text >= self.s.max_text) | (is_text & (tok == self.v.eos_id))
            if done.all():
                break
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], 1)
            pos = pos[:, -1:] + 1
            h = self.model.base_model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos,
                                      past_key_values=cache, use_cache=True).last_hidden_state[:, -1]
        n = torch.stack(alive, 1).sum(1).tolist()
        toks, lps = torch.stack(toks, 1), torch.stack(lps, 1)
        return [toks[i, : n[i]].tolist() for i in range(b)], [lps[i, : n[i]].tolist() for i in range(b)]

    def hidden(self, model, prefixes: list[list[int]], targets: list[list[int]]) -> torch.Tensor:
        """(N, D) the last hidden state at the position that predicts each target token, in order: one
        forward over every prefix + target."""
        seqs = [torch.tensor(p + t[:-1]) for p, t in zip(prefixes, targets)]
        h = model.base_model(input_ids=pad_sequence(seqs, batch_first=True),
                             attention_mask=pad_sequence([torch.ones(len(s)) for s in seqs],
                                                         batch_first=True)).last_hidden_state
        rows = torch.cat([torch.full((len(t),), i) for i, t in enumerate(targets)])
        at = torch.cat([len(p) - 1 + torch.arange(len(t)) for p, t in zip(prefixes, targets)])
        return h[rows, at]

    def step_logprobs(self, prompts, tokens) -> torch.Tensor:
        """(N,) log pi of every recorded token under its step's distribution, rollouts in order."""
        tok = torch.cat([torch.tensor(t) for t in tokens])
        step = torch.cat([torch.arange(len(t)) for t in tokens])
        thought = [(torch.tensor(t) >= self.v.text_size).long() for t in tokens]
        n_before = torch.cat([x.cumsum(0) - x for x in thought])
        logits = self.logits(self.hidden(self.model, prompts, tokens)).float()
        lp = logits.masked_fill(self.banned(n_before, step), float("-inf")).log_softmax(-1)
        return lp.gather(1, torch.searchsorted(self.cols, tok)[:, None])[:, 0]

    def text_loglik(self, model, prefixes, targets, full: bool) -> torch.Tensor:
        """(B,) mean log p(target_t | prefix, target_<t) under the text distribution (the text columns of the
        policy's head renormalised; full=True: a teacher's plain softmax over its whole vocabulary)."""
        h = self.hidden(model, prefixes, targets)
        tok = torch.cat([torch.tensor(t) for t in targets])
        if full:
            lp = model.get_output_embeddings()(h).float().log_softmax(-1).gather(1, tok[:, None])[:, 0]
        else:
            lp = self.logits(h)[:, : self.n_text].float().log_softmax(-1)
            lp = lp.gather(1, torch.searchsorted(self.cols, tok)[:, None])[:, 0]
        return torch.stack([x.mean() for x in lp.split([len(t) for t in targets])])

    def gold(self, row) -> list[int]:
        return self.tok(self.task.target(row, "answer")).input_ids + [self.v.eos_id]

    def rewards(self, prompts, tokens, rows) -> torch.Tensor:
        texts = [[t for t in ts if t < self.v.text_size] for ts in tokens]
        if self.s.reward == "exact_match":
            return torch.tensor([float(self.task.check(self.tok.decode(t, skip_special_tokens=True), row))
                                 for t, row in zip(texts, rows)])
        with torch.no_grad():
            if self.s.reward == "thought_gain":
                thoughts = [ts[: self.s.budget] for ts in tokens]
                gold = [self.gold(r) for r in rows]
                return (self.text_loglik(self.model, [p + z for p, z in zip(prompts, thoughts)], gold, False)
                        - self.text_loglik(self.model, prompts, gold, False))
            # teacher_kl: mean over the text tokens of log q(y_t | x, y_<t) - log pi_text(y_t | x, z, y_<t)
            q = self.text_loglik(self.teacher, prompts, texts, True)
            tok = torch.cat([torch.tensor(t) for t in tokens])
            text = tok < self.v.text_size
            h = self.hidden(self.model, prompts, tokens)
            lp = self.logits(h)[:, : self.n_text].float().log_softmax(-1)
            lp = lp[text].gather(1, torch.searchsorted(self.cols, tok[text])[:, None])[:, 0]
            return q - torch.stack([x.mean() for x in lp.split([len(t) for t in texts])])

    def loss(self, prompts, tokens, old_logps, rows) -> torch.Tensor:
        """TRL's dapo surrogate over the action steps (every step; with the thought gain only the slots),
        plus the latent term."""
        r = self.rewards(prompts, tokens, rows).reshape(-1, self.s.group)
        adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).reshape(-1)
        lp = self.step_logprobs(prompts, tokens)
        old = torch.cat([torch.tensor(o) for o in old_logps])
        a = torch.cat([adv[i].expand(len(t)) for i, t in enumerate(tokens)])
        gain = self.s.reward == "thought_gain"  # depends on the slots alone: only they are credited
        credited = torch.cat([torch.arange(len(t)) < (self.s.budget if gain else len(t)) for t in tokens])
        ratio = torch.exp(lp - old)
        per_token = -torch.min(ratio * a, ratio.clamp(1 - self.s.epsilon, 1 + self.s.epsilon) * a)
        loss = per_token[credited].sum() / credited.sum()
        if self.s.latent_coef:
            thoughts = [ts[: self.s.budget] for ts in tokens]
            gold = [self.gold(row) for row in rows]
            opened = [p + z for p, z in zip(prompts, thoughts)]
            nll = -self.text_loglik(self.model, opened, gold, False).mean()
            loss = loss + self.s.latent_coef * nll
        return loss

    def step(self, prompts, rows, seed: int) -> None:
        tokens, logps = self.sample(prompts, seed)
        self.model.train()
        self.loss(prompts, tokens, logps, rows).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.s.clip)
        self.opt.step()
        self.opt.zero_grad()


class StepTimes(TrainerCallback):
    """Seconds between the starts of consecutive optimizer steps: the Trainer loop's whole cost a step."""

    def __init__(self):
        self.starts: list[float] = []

    def on_step_begin(self, args, state, control, **kw):
        self.starts.append(time.perf_counter())

    def on_train_end(self, args, state, control, **kw):
        self.starts.append(time.perf_counter())

    def per_step(self, warm_up: int) -> float:
        gaps = [b - a for a, b in zip(self.starts, self.starts[1:])][warm_up:]
        return statistics.median(gaps)


def grads(model) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                      for p in model.parameters()])


def stand_ins(config: str, tmp: Path) -> list[str]:
    """The text config's student and teacher as small random stand-ins (the step's cost, not its result, is
    measured): a tiny student, a tiny teacher of another seed."""
    if "teacher_kl" not in Path(config).read_text():
        return []
    from thinktok.models.policy import load_policy

    for name, seed in (("student", 0), ("teacher", 1)):
        load_policy("tiny", 0, False, seed=seed).save(tmp / name)
    return [f"policy={tmp / 'student'}", f"teacher={tmp / 'teacher'}"]


def reference_for(trainer, cfg, model) -> Reference:
    from thinktok.envs import load_task
    from thinktok.models.teacher import Teacher

    th, rl = cfg.thought, cfg.rl
    if th.mode != "vocab" or th.slots_at != "prompt" or set(cfg.rewards.weights) - {
            "exact_match", "thought_gain", "teacher_kl"} or len(cfg.rewards.weights) != 1 or rl.beta:
        raise UserError(f"bench rl's reference step covers vocab mode, one reward of exact_match, "
                        f"thought_gain or teacher_kl, no KL: {cfg.name} is outside it")
    setup = Setup(budget=th.budget, slots=bool(th.slots), max_text=cfg.sampling.max_new_tokens,
                  reward=next(iter(cfg.rewards.weights)), latent_coef=rl.latent_coef,
                  group=rl.num_generations, lr=rl.lr, clip=rl.max_grad_norm, epsilon=rl.epsilon)
    teacher = Teacher.load(cfg.teacher).model if cfg.teacher else None
    return Reference(model, trainer.processing_class, load_task(cfg.task), trainer.thought_mode.vocab, setup,
                     teacher)


def check_same_computation(trainer, ref: Reference, prompts: list[str], rows: list[dict]) -> dict:
    """The project's stages 4-6 and the reference's loss on the same collected rollouts: same rewards, loss
    and gradients, or an error saying by how much they differ."""
    model = trainer.model
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer.collector(prompts, trainer, 0)
    model.train()
    rec = trainer.recompute(model, batch)
    adv = trainer.advantages(batch, rec)
    ours = trainer.objective(rec, adv, batch) + trainer.extra_loss(model, rec, batch)
    model.zero_grad()
    ours.backward()
    g_ours = grads(model)
    model.zero_grad()
    ids = [r.prompt_ids for r in batch.rollouts]
    tokens = [r.token.tolist() for r in batch.rollouts]
    theirs = ref.loss(ids, tokens, [r.logprob.tolist() for r in batch.rollouts], rows)
    theirs.backward()
    g_ref = grads(model)
    model.zero_grad()
    reward_gap = (batch.reward - ref.rewards(ids, tokens, rows)).abs().max().item()
    gap = {"reward": reward_gap, "loss": abs(ours.item() - theirs.item()),
           "grad": (g_ours - g_ref).abs().max().item(), "grad_norm": g_ours.norm().item()}
    if max(gap["reward"], gap["loss"], gap["grad"]) > 1e-5:
        raise RuntimeError(f"bench rl: the reference step is not the project's computation: {gap}")
    return gap


def bench_rl(configs: tuple[str, ...], steps: int, warm_up: int, out: Path) -> dict:
    """rl.json, rewritten after every config."""
    from thinktok.config import load_config
    from thinktok.models.policy import load_policy
    from thinktok.rl.actors import stop_workers
    from thinktok.rl.config import TrainConfig
    from thinktok.rl.train import build_run

    results = {"steps": steps, "warm_up": warm_up, "threads": torch.get_num_threads(), "configs": {}}
    for config in configs:
        row = results["configs"][config] = {}
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            overrides = stand_ins(config, tmp)
            for engine in ("inline", "ray"):
                cfg = load_config(TrainConfig, config, [
                    *overrides, f"run_dir={tmp / engine}", f"rl.max_steps={warm_up + steps}", "eval_every=0",
                    f"save_every={10 ** 9}", f"ray.inline={engine == 'inline'}"])
                trainer, workers, _ = build_run(cfg)
                try:
                    train_rows = trainer.collector.rows
                    names = list(train_rows)[: cfg.rl.prompts_per_step]
                    prompts = [p for p in names for _ in range(cfg.rl.num_generations)]
                    rows = [train_rows[p] for p in prompts]
                    if engine == "inline":
                        row["same_computation"] = check_same_computation(
                            trainer, reference_for(trainer, cfg, trainer.model), prompts, rows)
                    timer = StepTimes()
                    trainer.add_callback(timer)
                    trainer.train()
                    row[f"{engine}_ms"] = 1000 * timer.per_step(warm_up)
                finally:
                    stop_workers(workers)
            th = cfg.thought
            init = load_policy(str(cfg.out_dir / "policy_init"), th.vocab_tokens, th.markers)
            ref = reference_for(trainer, cfg, init.model)
            ids = [trainer.processing_class(p).input_ids for p in prompts]
            times = []
            for i in range(warm_up + steps):
                t = time.perf_counter()
                ref.step(ids, rows, seed=i)
                times.append(time.perf_counter() - t)
            row["reference_ms"] = 1000 * statistics.median(times[warm_up:])
        batch = len(prompts)
        for engine in ("inline", "ray"):
            row[f"{engine}_vs_reference"] = row[f"{engine}_ms"] / row["reference_ms"]
        row["rollouts_per_s"] = {k: 1000 * batch / row[f"{k}_ms"] for k in ("inline", "ray", "reference")}
        print(f"{cfg.name}: reference {row['reference_ms']:.0f} ms a step; project inline "
              f"{row['inline_ms']:.0f} ms ({row['inline_vs_reference']:.2f}x), with Ray "
              f"{row['ray_ms']:.0f} ms ({row['ray_vs_reference']:.2f}x); {batch} rollouts a step")
        write_json(out / "rl.json", results)
    print(f"saved {out / 'rl.json'}")
    return results
