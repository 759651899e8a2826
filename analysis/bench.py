"""`thinktok bench rollout`: tokens/s of the sampler in every thought mode against HF `generate` on the
same model, batch and length, in one process. Prints ratios (absolute times mean something only on a
GPU) and saves JSON."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from thinktok.compat import cache_kwarg
from thinktok.errors import UserError
from thinktok.models.policy import load_policy
from thinktok.models.thought_config import SamplingConfig, ThoughtConfig
from thinktok.models.thought_modes import make_mode
from thinktok.rl.sampler import sample

from .timing import timed, write_json

BENCH_MODES = {
    "vocab": dict(mode="vocab", num_thinking=64),
    "continuous": dict(mode="continuous", num_thinking=0),
    "soft": dict(mode="soft", num_thinking=0, noise="gumbel"),
    "pause": dict(mode="pause", num_thinking=1, num_pause=8),
}


# the sampler's paths: the dynamic KV cache (the reference) and the static cache with a compiled decoding step
ENGINES = {"dynamic": {}, "compiled": {"compile": True}}


def bench_rollout(model_name: str, batch: int, new_tokens: int, repeats: int, device: str, dtype: str,
                  out: Path, modes: tuple[str, ...] = tuple(BENCH_MODES),
                  engines: tuple[str, ...] = tuple(ENGINES)) -> dict:
    """rollout.json is rewritten after every mode (a run stopped midway keeps what it measured). An engine
    that fails (a compile error, say) is recorded in its row and raised once every mode has run."""
    torch_dtype = getattr(torch, dtype)
    prompt = [[1105, 1635, 4974, 796]] * batch  # "12 * 34 ="
    results = {"model": model_name, "batch": batch, "new_tokens": new_tokens, "device": device,
               "dtype": dtype,
               "modes": {}}
    out.mkdir(parents=True, exist_ok=True)
    path, failed, baseline = out / "rollout.json", [], None
    for name in modes:
        # thoughts take a quarter of the steps, so every mode runs `new_tokens` decoding steps in all
        cfg = ThoughtConfig(max_thought_tokens=new_tokens // 4, **BENCH_MODES[name])
        policy = load_policy(model_name, cfg.vocab_tokens, cfg.markers, dtype=torch_dtype)
        model = policy.model.to(device).eval()
        thought_steps = cfg.max_thought_tokens + 2 if cfg.markers else cfg.num_pause if name == "pause" else 0
        sampling = SamplingConfig(max_new_tokens=new_tokens - thought_steps, stop_at_eos=False)
        mode = make_mode(cfg, policy.vocab, sampling).to(device)
        if baseline is None:  # HF generate on the same model, batch and length
            ids = torch.tensor(prompt, device=device)

            def generate():
                with torch.no_grad():
                    return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                          max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                          pad_token_id=policy.vocab.eos_id)

            gen_tokens = (generate().shape[1] - ids.shape[1]) * batch  # (also the warm-up)
            baseline = gen_tokens / timed(generate, repeats, device, warm_up=0)
            results["generate_tokens_per_s"] = baseline
        row = results["modes"][name] = {}
        for engine in engines:

            def run(engine=engine):
                return sample(model, mode, prompt, **ENGINES[engine])

            try:
                steps = sum(r.num_steps for r in run())  # the warm-up (the compiled path compiles here)
                rate = steps / timed(run, repeats, device, warm_up=0)
            except Exception as e:  # noqa: BLE001 -- recorded, the other engines and modes still run
                row[engine] = {"error": f"{type(e).__name__}: {e}"[:2000]}
                failed.append(f"{name}/{engine}")
                continue
            row[engine] = {"tokens_per_s": rate, "steps": steps, "ratio_vs_generate": rate / baseline}
        ok = [e for e in engines if "error" not in row[e]]
        line = ", ".join(f"{e} {row[e]['ratio_vs_generate']:5.2f}x generate" for e in ok)
        if {"dynamic", "compiled"} <= set(ok):
            row["compiled_vs_dynamic"] = row["compiled"]["tokens_per_s"] / row["dynamic"]["tokens_per_s"]
            line += f" (compiled = {row['compiled_vs_dynamic']:.2f}x dynamic)"
        print(f"{name:>10}: {line}; generate {baseline:.1f} tokens/s"
              + "".join(f"; {e} FAILED: {row[e]['error'][:200]}" for e in engines if e not in ok))
        write_json(path, results)
    print(f"saved {path}")
    if failed:
        raise RuntimeError(f"bench rollout: {', '.join(failed)} failed (errors in {path})")
    return results


def bench_train(config: str, overrides: list[str], steps: int, workers: tuple[int, ...], out: Path) -> dict:
    """`thinktok bench train`: samples/s and step time of the RL loop for 1, 2, 4 rollout actors in one
    process (one local Ray cluster), as ratios against one actor."""
    import tempfile

    from thinktok.config import load_config
    from thinktok.rl.config import TrainConfig
    from thinktok.rl.train import run_train

    results = {"config": config, "steps": steps, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for n in workers:
            cfg = load_config(TrainConfig, config,
                              [*overrides, f"ray.num_rollout_workers={n}", f"run_dir={tmp}/{n}",
                                                    f"rl.max_steps={steps}", "eval_every=0",
                                                    f"save_every={steps}"])
            if cfg.ray.inline:
                raise UserError("bench train measures scaling over Ray actors: ray.inline runs the workers "
                                "one after another in the learner's process (drop ray.inline=true)")
            run_train(cfg)
            log = (Path(tmp) / str(n) / "metrics.jsonl").read_text().splitlines()
            lines = [json.loads(x) for x in log][1:]  # the first step is the warm-up
            rate = statistics.mean(m["samples_per_s"] for m in lines)
            batch = cfg.rl.prompts_per_step * cfg.rl.num_generations
            results["runs"][n] = {"samples_per_s": rate, "step_s": batch / rate}
    base = results["runs"][workers[0]]["samples_per_s"]
    for n, r in results["runs"].items():
        r["scaling_vs_1"] = r["samples_per_s"] / base
        print(f"{n} rollout actors: {r['samples_per_s']:7.1f} samples/s, {r['step_s']:.2f} s/step, "
              f"{r['scaling_vs_1']:.2f}x one actor")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "train.json", results)
    print(f"saved {out / 'train.json'}")
    return results


def bench_parallel(model_name: str, batch: int, num_text: int, thought_len: int, lookahead: int, repeats: int,
                   device: str, dtype: str, out: Path) -> dict:
    """`thinktok bench parallel`: real tokens per second that get a thought of `thought_len` tokens and a
    scored gain over `lookahead` true tokens, against the base model just reading the text (Quiet-STaR's
    complaint: 0.38 tokens/s with thoughts vs 2.94 without), against the naive form (T separate KV-cached
    rollouts, one per position) and, for the teacher-forced scoring pass, against a dense explicit mask."""
    from thinktok.kernels.parallel_thought import parallel_thought_mask
    from thinktok.models.parallel_gpt2 import layout_positions, parallel_hidden
    from thinktok.rl.parallel.config import ParallelConfig
    from thinktok.rl.parallel.rollout import sample_parallel
    from thinktok.rl.parallel.scorer import ParallelScorer

    torch_dtype = getattr(torch, dtype)
    cfg = ThoughtConfig(mode="vocab", num_thinking=64)
    policy = load_policy(model_name, cfg.vocab_tokens, cfg.markers, dtype=torch_dtype)
    model = policy.model.to(device).eval()
    mode = make_mode(cfg, policy.vocab, SamplingConfig()).to(device)
    real = torch.randint(0, policy.vocab.text_size, (batch, num_text),
                         generator=torch.Generator().manual_seed(0)).to(device)
    scorer = ParallelScorer(ParallelConfig(num_text=num_text, thought_len=thought_len, lookahead=lookahead),
                            model, mode)
    lo, hi = policy.vocab.text_size, policy.vocab.text_size + policy.vocab.num_thinking

    @torch.no_grad()
    def base():
        model(input_ids=real)

    def parallel():
        scorer(sample_parallel(model, mode, real, thought_len))

    kv = cache_kwarg(model)

    @torch.no_grad()
    def naive():  # the loop one writes without the parallel layout: every position its own KV-cached rollout
        for t in range(num_text - 1):
            o = model(input_ids=real[:, : t + 1], use_cache=True)
            for _ in range(thought_len):
                tok = torch.multinomial(o.logits[:, -1, lo:hi].float().softmax(-1), 1) + lo
                o = model(input_ids=tok, use_cache=True, **{kv: getattr(o, kv)})
            if lookahead > 1:
                model(input_ids=real[:, t + 1 : t + lookahead], use_cache=True, **{kv: getattr(o, kv)})

    seg = thought_len + lookahead - 1
    ids = torch.cat([real, torch.randint(lo, hi, (batch, num_text * seg), device=device)], 1)

    @torch.no_grad()
    def scored_pass():
        parallel_hidden(model, ids, num_text, seg)

    mask = parallel_thought_mask(num_text, seg, device)
    dense = torch.zeros(mask.shape, dtype=torch_dtype, device=device).masked_fill(~mask, float("-inf"))[
        None, None]
    positions = layout_positions(num_text, seg, device)[None]

    @torch.no_grad()
    def dense_pass():
        model.base_model(input_ids=ids, position_ids=positions, attention_mask=dense)

    tokens = batch * num_text
    secs = {name: timed(fn, repeats, device) for name, fn in
            (("base", base), ("parallel", parallel), ("naive", naive), ("scored_pass", scored_pass),
             ("dense_pass", dense_pass))}
    results = {"model": model_name, "batch": batch, "num_text": num_text, "thought_len": thought_len,
               "lookahead": lookahead, "device": device, "dtype": dtype, "seconds": secs,
               "tokens_per_s": {k: tokens / v for k, v in secs.items() if k in ("base", "parallel", "naive")},
               "parallel_vs_base": secs["base"] / secs["parallel"],
               "parallel_vs_naive": secs["naive"] / secs["parallel"],
               "kernel_vs_dense_mask": secs["dense_pass"] / secs["scored_pass"]}
    # the work itself: per window, T prefix + T*L sampled thought tokens, then T + T*(L+n-1) scored tokens
    processed = batch * num_text * (2 + 2 * thought_len + lookahead - 1)
    results["processed_tokens_per_s_vs_base"] = processed / secs["parallel"] / results["tokens_per_s"]["base"]
    tps = results["tokens_per_s"]
    print(f"real tokens/s with a {thought_len}-token thought scored over {lookahead}: parallel "
          f"{tps['parallel']:.1f}, naive {tps['naive']:.1f}; base model reading the text: {tps['base']:.1f}")
    print(f"parallel = {results['parallel_vs_base']:.3f}x the base model's reading speed, "
          f"{results['parallel_vs_naive']:.1f}x the naive per-position loop; it processes "
          f"{processed // (batch * num_text)} tokens per real token, at "
          f"{results['processed_tokens_per_s_vs_base']:.2f}x the base model's tokens/s")
    print(f"scoring pass, parallel-thought attention vs dense explicit mask: "
          f"{results['kernel_vs_dense_mask']:.2f}x"
          + ("" if device.startswith("cuda") else " (CPU: both are dense SDPA; the kernel needs CUDA)"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "parallel.json"
    write_json(path, results)
    print(f"saved {path}")
    return results


def bench_head(model_name: str, batch: int, repeats: int, device: str, out: Path) -> dict:
    """`thinktok bench head`: the step time of SFT (chain of thought, loss over the labelled positions, one
    optimizer step) and of one RL step's compute (sample a batch with 4 vocab slots, recompute its log-probs,
    backward, optimizer step) with the task-vocabulary head against the full head, on 2-digit multiplication,
    same model, batch and data, in one process."""
    from thinktok.envs import TaskConfig, load_task
    from thinktok.models.head import restrict_head, task_text_ids
    from thinktok.rl.recompute import recompute_logprobs
    from thinktok.sft import collate, encode, label_loss
    from thinktok.sft_config import SFTConfig

    task = load_task(TaskConfig(digits=2, spaced=True, reverse=True, num_train=batch, num_val=1, num_test=1))
    rows = list(task.dataset["train"])
    thought = ThoughtConfig(mode="vocab", num_thinking=16, slots=4)
    results = {"model": model_name, "batch": batch, "device": device, "seconds": {}}
    for head in ("full", "task"):
        policy = load_policy(model_name, thought.vocab_tokens, thought.markers, seed=0)
        if head == "task":
            restrict_head(policy.model, task_text_ids(task, policy.tokenizer), policy.vocab.text_size)
        model = policy.model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        sft_cfg = SFTConfig(format="cot")
        data = collate([encode(policy.tokenizer, policy, sft_cfg, task, r) for r in rows],
                       policy.vocab.eos_id)
        data = {k: v.to(device) for k, v in data.items()}
        mode = make_mode(thought, policy.vocab, SamplingConfig(max_new_tokens=8)).to(device)
        prompts = [policy.tokenizer(r["prompt"]).input_ids for r in rows]

        def sft_step():
            label_loss(model, data["input_ids"], data["attention_mask"], data["labels"],
                       data["latent_pos"]).backward()
            opt.step()
            opt.zero_grad()

        def rl_step():
            rollouts = sample(model, mode, prompts, seed=0)
            model.train()
            rec = recompute_logprobs(model, mode, rollouts)
            (rec.logprob * rec.valid).sum().backward()
            opt.step()
            opt.zero_grad()

        results["seconds"][head] = {"sft_step": timed(sft_step, repeats, device),
                                    "rl_step": timed(rl_step, repeats, device)}
    full, task_ = results["seconds"]["full"], results["seconds"]["task"]
    results["task_vs_full"] = {k: full[k] / task_[k] for k in full}
    ratio = results["task_vs_full"]
    print(f"task head vs full head, {model_name}, batch {batch}: SFT step {ratio['sft_step']:.1f}x faster, "
          f"RL step {ratio['rl_step']:.1f}x faster")
    write_json(out / "head.json", results)
    print(f"saved {out / 'head.json'}")
    return results
