"""`thinktok train` on the CPU with local Ray: a shortened run, resume == uninterrupted, actor death,
poisoned rewards, each algorithm and vector modes, and the learner's override against TRL's base method."""

import copy
import importlib
import json
import os
import sys
import time
from pathlib import Path
from unittest.mock import patch

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from conftest import make
from thinktok.analysis.compare import summary
from thinktok.config import load_config
from thinktok.errors import PoisonedStep
from thinktok.models.policy import load_policy
from thinktok.models.thoughts import Action
from thinktok.rl.actors import (
    Publisher,
    RolloutWorker,
    init_ray,
    sequential_workers,
    start_workers,
    stop_workers,
)
from thinktok.rl.config import RayConfig, TrainConfig
from thinktok.rl.ppo import gae
from thinktok.rl.sampler import sample
from thinktok.rl.step import Collector
from thinktok.rl.train import latest_checkpoint, run_train


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """The module's teacher checkpoint, and its one Ray cluster, started here so that its actors take the CPU
    attention path (TRITON_INTERPRET=0 in their environment) whatever test comes first: the Triton kernel
    in the interpreter costs ~0.6 s a launch, and its tests (test_kernels, test_parallel) run in this process.
    The learner of one parallel run here trains through it (LEARNER_INTERPRETS)."""
    path = tmp_path_factory.mktemp("teacher") / "t"
    load_policy("tiny", 0, False, seed=3).save(path)
    ray.shutdown()  # a cluster an earlier module left up has the environment it was started with
    with patch.dict(os.environ, {} if torch.cuda.is_available() else {"TRITON_INTERPRET": "0"}):
        init_ray(RayConfig())
    yield str(path)
    if ray.is_initialized():
        ray.shutdown()


def config(tmp_path, teacher, *overrides):
    """A short teacher-scored run: tiny random policy, free placement, a small task, a few steps."""
    base = [f"run_dir={tmp_path}", f"teacher={teacher}", "policy=tiny", "task.spaced=true",
            "task.reverse=true",
            "thought.init=norm", "task.num_train=64", "task.num_val=8",
            "task.num_test=8", "thought.num_thinking=8", "thought.max_thought_tokens=3",
            "sampling.max_new_tokens=6",
            "rl.prompts_per_step=2", "rl.num_generations=3", "rl.max_steps=3", "rl.lr=1e-3", "eval_every=2",
            "eval_examples=4", "save_every=2", "samples_per_eval=2", "ray.num_rollout_workers=2"]
    return load_config(TrainConfig, None, base + list(overrides))


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


STEPS_WHOLE = 5  # saves and evals every 2 steps: the last step is neither, so the run adds both at its end


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, teacher):
    """A 5-step run, left as it finished: (its directory, what run_train returned). The short run's outputs
    and the uninterrupted side of resume."""
    out = tmp_path_factory.mktemp("whole")
    return out, run_train(config(out, teacher, f"rl.max_steps={STEPS_WHOLE}"))


def test_short_run_writes_everything(whole_run, teacher):
    whole, final = whole_run
    lines = metrics(whole)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    keys = {"step", "reward_mean", "reward_std", "thought_steps_mean", "text_tokens_mean", "kl", "loss",
            "samples_per_s",
            "weight_version", "logprob_mismatch"}
    assert all(keys <= m.keys() and all(v is not None for v in m.values()) for m in lines)
    # on-policy: the Ray workers' sampling log-probs are the learner's own, to float error, at every step (the
    # learner changed its weights in between: a worker that sampled with stale weights would show here)
    assert all(m["logprob_mismatch"] < 1e-4 for m in lines)
    assert final == latest_checkpoint(whole) and final.name == "checkpoint-5"  # saved at the end
    assert (whole / "trainer" / "checkpoint-2").exists() and (whole / "trainer" / "checkpoint-4").exists()
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.get_input_embeddings().weight.shape[0] == 50257 + 8
    assert load_policy(str(final), 8, False).tokenizer.convert_tokens_to_ids("<think7>") == 50264
    assert list((whole / "tb").rglob("events.out.tfevents*"))
    samples = whole / "samples"
    assert (samples / "step_2.html").exists() and (samples / "step_2.jsonl").exists()
    evals = [json.loads(line) for line in (whole / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 2, 4, 5] and evals[0]["num_examples"] == 4  # start, every 2, end
    table = summary([str(whole)])  # the start/end table `thinktok train` prints: first and last eval
    assert table["start"]["learned"]["mean"] == evals[0]["accuracy"]
    end_shuffled = evals[-1]["controls"]["shuffled_thoughts"]["accuracy"]
    assert table["end"]["shuffled_thoughts"]["values"] == [end_shuffled]
    trainer_dir = whole / "trainer"
    assert not list(trainer_dir.glob(".saving*")) and not list(trainer_dir.glob(".checkpoint*"))
    before = (whole / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="already holds a run"):
        run_train(config(whole, teacher, f"rl.max_steps={STEPS_WHOLE}"))
    # resumed at its end, the Trainer would take one more step than rl.max_steps asks for
    with pytest.raises(ValueError, match=f"finished at step {STEPS_WHOLE}.*with N > {STEPS_WHOLE}"):
        run_train(config(whole, teacher, f"rl.max_steps={STEPS_WHOLE}"), resume=True)
    assert (whole / "metrics.jsonl").read_text() == before  # refused before touching it


def cut_and_resumed(cut: Path, make_config, trainer_cls, monkeypatch, steps: int) -> Path:
    """The uninterrupted run's config killed during the third step, then resumed: the resumed dir."""
    original = trainer_cls.training_step
    calls = []

    def dies_at_third_step(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return original(self, *a, **k)

    monkeypatch.setattr(trainer_cls, "training_step", dies_at_third_step)
    with pytest.raises(KeyboardInterrupt):
        run_train(make_config(cut))
    monkeypatch.setattr(trainer_cls, "training_step", original)
    assert len(metrics(cut)) == 2
    run_train(make_config(cut), resume=True)
    assert [m["step"] for m in metrics(cut)] == list(range(1, steps + 1))
    return cut


def test_resume_matches_uninterrupted(whole_run, tmp_path, teacher, monkeypatch):
    from thinktok.rl.train import GRPORun

    whole, _ = whole_run
    # the cut and resumed run's two workers inline, the uninterrupted run's Ray actors: resume and inline
    # workers (the same samples and scores as actors) are both checked by the equality below
    cut = cut_and_resumed(tmp_path / "cut",
                          lambda d: config(d, teacher, f"rl.max_steps={STEPS_WHOLE}", "ray.inline=true"),
                          GRPORun, monkeypatch, STEPS_WHOLE)
    for x, y in zip(metrics(whole), metrics(cut), strict=True):
        for key in ("reward_mean", "reward_std", "loss", "thought_steps_mean", "text_tokens_mean",
                    "weight_version"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), (x["step"], key)
    last = f"checkpoint-{STEPS_WHOLE}"
    wa = AutoModelForCausalLM.from_pretrained(whole / "trainer" / last).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(cut / "trainer" / last).state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


class HeldRolloutWorker(RolloutWorker):
    """A rollout worker whose first `sample` call (in any incarnation) with `started` set writes that file
    and then waits to be killed: the test's event that the call is in progress. The retried call, in the
    restarted actor, finds the file and samples."""

    def sample(self, prompts, seed, weights, version, started: str | None = None):
        if started is not None and not Path(started).exists():
            Path(started).write_text(str(os.getpid()))
            time.sleep(600)
        return super().sample(prompts, seed, weights, version)


def test_dead_rollout_actor_is_restarted_without_losing_samples(teacher, tmp_path):
    cfg = TrainConfig(ray=RayConfig(num_rollout_workers=1, num_reward_workers=0))  # no scoring here
    cfg.thought.num_thinking = 8
    policy = load_policy("tiny", 8, False)
    path = teacher + "_policy"
    policy.save(path)
    (_, rollout_args), reward = sequential_workers(path, teacher, cfg.thought, cfg.sampling, cfg.rewards,
                                                   cfg.task)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    workers = start_workers(cfg.ray, (HeldRolloutWorker, rollout_args), reward)
    try:
        mode = policy_mode(policy)  # num_thinking=8, a full head: the workers' mode
        weights = Publisher(workers)({"model": policy.model, "mode": mode}, 1)
        prompts = [[1105, 1635, 4974, 796]] * 6  # the call is held until the kill, whatever its size
        (victim,) = workers.rollout
        pid = ray.get(victim.pid.remote())
        threads = torch.get_num_threads()
        try:  # the same worker class in this process, with the actors' one thread: what the call must return
            expected = RolloutWorker(*rollout_args, "cpu").sample(prompts, 11, weights, 1)
        finally:
            torch.set_num_threads(threads)
        started = tmp_path / "started"
        pending = victim.sample.remote(prompts, 11, weights, 1, str(started))
        while not started.exists():  # the call is in progress (and held there) once this exists
            time.sleep(0.05)
        ray.kill(victim, no_restart=False)
        got = ray.get(pending)
        assert ray.get(victim.pid.remote()) != pid  # it really died and came back
        assert len(got) == len(expected)
        assert all(torch.equal(a.token, b.token) and torch.equal(a.logprob, b.logprob) for a, b in zip(
            got, expected))
    finally:
        stop_workers(workers)


def test_nan_reward_stops_the_step_without_checkpoint(tmp_path, teacher):
    bad = tmp_path / "nan_teacher"
    p = load_policy("tiny", 0, False)
    with torch.no_grad():
        p.model.lm_head.weight.fill_(float("nan"))
    p.save(bad)
    with pytest.raises(PoisonedStep, match="reward teacher_loglik is nan for rollout 0"):
        run_train(config(tmp_path / "run", str(bad), "ray.num_rollout_workers=1", "ray.inline=true"))
    assert not list((tmp_path / "run" / "trainer").glob("checkpoint-*"))


def test_scorer_errors_keep_their_cause():
    """A scorer's finiteness check ends the step in one line naming it; any other error in a reward worker is
    a bug and propagates with its own type and the worker's traceback."""
    init_ray(RayConfig())

    @ray.remote(max_retries=0)
    def poisoned():
        raise PoisonedStep("reward gold_loglik is nan for rollout 2; refusing to train on it")

    @ray.remote(max_retries=0)
    def buggy():
        raise ValueError("a bug in the reward worker")

    with pytest.raises(PoisonedStep, match="^scoring failed at step 3: reward gold_loglik is nan"):
        Collector.get_scores([poisoned.remote()], 3)
    with pytest.raises(ValueError, match="a bug in the reward worker") as caught:
        Collector.get_scores([buggy.remote()], 3)
    assert not isinstance(caught.value, PoisonedStep)
    assert "in buggy" in str(caught.value)  # the worker's traceback, down to the raising line


@pytest.mark.parametrize("overrides", [
    ["rl.algo=ppo", "thought.mode=continuous", "thought.num_thinking=0", "thought.learn_sigma=true"],
    ["rl.algo=rloo", "thought.mode=soft", "thought.num_thinking=0", "rl.beta=0.1"],
    ["rl.algo=grpo", "thought.mode=pause", "thought.num_thinking=2", "rl.beta=0.05",
     "rewards.weights={teacher_kl: 1.0, exact_match: 1.0, gold_loglik: 0.5}", "rewards.thinking_cost=0.01"],
])
def test_algorithms_and_modes(tmp_path, teacher, overrides, two_threads):
    final = run_train(config(tmp_path, teacher, "rl.max_steps=2", "eval_every=0", "ray.num_rollout_workers=1",
                             "ray.inline=true", *overrides))
    assert torch.get_num_threads() == two_threads  # the inline workers' one thread did not stay
    lines = metrics(tmp_path)
    assert len(lines) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)
    assert all(m["logprob_mismatch"] < 1e-4 for m in lines)  # on-policy in every mode
    # rl.beta: the text-step KL to the initial policy, 0 while the policy is still its reference (step 1),
    # positive once it has moved (step 2); without it no KL is computed
    if any(o.startswith("rl.beta=") for o in overrides):
        assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-6) and 1e-9 < lines[1]["kl"] < 1.0
    else:
        assert [m["kl"] for m in lines] == [0.0, 0.0]
    init = AutoModelForCausalLM.from_pretrained(tmp_path / "policy_init").state_dict()
    after = AutoModelForCausalLM.from_pretrained(final).state_dict()
    assert any(not torch.equal(init[k], after[k]) for k in init)  # the learner moved the weights
    extra = torch.load(final / "thinktok_extra.pt")
    if "rl.algo=ppo" in overrides:
        assert extra["value_head"]["weight"].abs().sum() > 0
        assert extra["mode"]["log_sigma"] != torch.tensor(0.1).log()


def test_gae_by_hand():
    r = torch.tensor([[0.0, 1.0, 2.0]])
    v = torch.tensor([[0.5, 0.2, 0.1]])
    valid = torch.tensor([[True, True, False]])
    adv, ret = gae(r, v, valid, gamma=0.9, lam=0.8)
    d1 = 1.0 - 0.2  # last valid step: no bootstrap
    d0 = 0.0 + 0.9 * 0.2 - 0.5
    assert torch.allclose(adv, torch.tensor([[d0 + 0.9 * 0.8 * d1, d1, 0.0]]))
    assert torch.allclose(ret, adv + v * valid)


def test_logps_override_matches_trl_base_method(tmp_path):
    """For discrete thinking tokens with no mask in force, our recompute is exactly TRL's own log-probs (the
    base method our override replaces)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from thinktok.rl.learner import ThoughtGRPOTrainer
    from thinktok.rl.recompute import recompute_logprobs

    policy, mode = make("vocab", max_new_tokens=5)
    mode.cfg.max_thought_tokens = 50
    # equal prompt lengths: TRL's base method left-pads prompts without position ids, which shifts GPT-2's
    # positions for shorter prompts (our recompute packs right-padded with true positions, as sampled)
    rollouts = sample(policy.model, mode, [[1105, 1635, 796], [15496, 11, 995]], seed=4)
    assert sum(r.num_thought for r in rollouts) > 0
    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=False,
                      per_device_train_batch_size=2, num_generations=2, report_to=[])
    trainer = ThoughtGRPOTrainer(model=policy.model, args=args, processing_class=policy.tokenizer,
                                 train_dataset=Dataset.from_dict({"prompt": ["a", "b"]}),
                                 collector=None, extra_modules={"mode": mode})
    width = max(len(r.prompt_ids) for r in rollouts)
    steps = max(r.num_steps for r in rollouts)
    ids = torch.zeros(2, width + steps, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rollouts):  # TRL's layout: prompts left-padded, completions right-padded
        ids[i, width - len(r.prompt_ids) : width] = torch.tensor(r.prompt_ids)
        ids[i, width : width + r.num_steps] = r.token
        mask[i, width - len(r.prompt_ids) : width + r.num_steps] = 1
    ours = recompute_logprobs(policy.model, mode, rollouts).logprob
    base, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, policy.model, ids, mask, steps)
    # steps sampled from the plain softmax over text + thinking tokens (ANY: under the thought budget) are
    # what TRL computes; past the budget our distribution masks thinking tokens and TRL's cannot know it
    unmasked = torch.zeros_like(mask[:, width:], dtype=torch.bool)
    for i, r in enumerate(rollouts):
        unmasked[i, : r.num_steps] = r.action == Action.FREE
    assert unmasked.sum() > 5
    assert torch.allclose(ours[unmasked], base[unmasked], atol=1e-5)
    budget = torch.zeros_like(unmasked)
    for i, r in enumerate(rollouts):
        budget[i, : r.num_steps] = r.action == Action.TEXT
    recorded = torch.cat([r.logprob[r.action == Action.TEXT] for r in rollouts])
    assert budget.any() and torch.allclose(ours[budget], recorded, atol=1e-5)


PARALLEL = Path(__file__).parents[1] / "configs" / "parallel_quickstart.yaml"


def parallel_config(run_dir, teacher, *overrides):
    return load_config(TrainConfig, PARALLEL, [
        f"run_dir={run_dir}", f"teacher={teacher}", "policy=tiny", "task.num_train=32", "task.num_val=8",
        "task.num_test=8", "thought.num_thinking=8", "parallel.num_text=8", "parallel.thought_len=2",
        "parallel.lookahead=2", "rl.prompts_per_step=2", "rl.num_generations=2", "rl.max_steps=2",
        "rl.lr=1e-2",
        "eval_every=2", "eval_examples=4", "save_every=2", "samples_per_eval=1", *overrides])


# On a CPU-only machine, the learner's attention in each parallel run: "1" the Triton kernel (forward and
# backward) in the interpreter, about 0.6 s a launch and most of a run's time; "0" the CPU path (the
# reference's mask through PyTorch's SDPA). The kernel's agreement with the reference is
# tests/test_kernels.py's and test_parallel.py's; here one run trains through it. The actors take the CPU
# path (the `teacher` fixture's cluster). With CUDA the kernels are compiled and a CPU learner takes the CPU
# path anyway.
LEARNER_INTERPRETS = {"teacher": "1", "policy": "0"}
# the policy-scored run is also the uninterrupted side of the parallel resume (whose cut and resumed run
# samples inline); the teacher-scored one splits its windows over two rollout actors
STEPS, WORKERS = {"teacher": 2, "policy": 4}, {"teacher": 2, "policy": 1}
# Triton picks interpreted or compiled kernels when they are defined, so define them now, while conftest's
# TRITON_INTERPRET=1 holds, not first inside a run that turned it off
for kernel in ("parallel_thought", "parallel_decode"):
    importlib.import_module(f"thinktok.kernels.{kernel}")


def learner_env(scorer: str) -> dict[str, str]:
    return {} if torch.cuda.is_available() else {"TRITON_INTERPRET": LEARNER_INTERPRETS[scorer]}


def scored_parallel_config(run_dir, teacher, scorer: str, mixing: str, *overrides):
    """parallel_config for a run of `parallel_runs` (and the resume of the policy-scored one)."""
    return parallel_config(run_dir, teacher, f"parallel.scorer={scorer}", f"parallel.mixing_head={mixing}",
                           f"rl.max_steps={STEPS[scorer]}", f"ray.num_rollout_workers={WORKERS[scorer]}",
                           *overrides)


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory, teacher):
    """(scorer, mixing head) -> a finished parallel run (STEPS), trained once for the module: the
    policy-scored run with a mixing head is also the uninterrupted side of the parallel resume."""
    runs = {}

    def get(scorer: str, mixing: str) -> Path:
        if (scorer, mixing) not in runs:
            out = tmp_path_factory.mktemp(f"parallel-{scorer}-{mixing}")
            with patch.dict(os.environ, learner_env(scorer)):
                run_train(scored_parallel_config(out, teacher, scorer, mixing))
            runs[scorer, mixing] = out
        return runs[scorer, mixing]

    return get


@pytest.mark.parametrize("scorer,mixing", [("policy", "true"), ("teacher", "false")])
def test_parallel_run(parallel_runs, teacher, scorer, mixing, monkeypatch):
    """rollout=parallel through Ray and TRL: per-position gains, the learner's recompute (through the kernel
    with scorer=teacher, the CPU path with scorer=policy), checkpoints."""
    run = parallel_runs(scorer, mixing)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the checks below, on the CPU path (see LEARNER_INTERPRETS)
    final = latest_checkpoint(run)
    lines = metrics(run)
    assert [m["step"] for m in lines] == list(range(1, STEPS[scorer] + 1))
    assert all({"gain_mean", "nll_base", "nll_thought", "thought_tokens"} <= m.keys() for m in lines)
    assert lines[0]["thought_tokens"] == 16 and lines[1]["weight_version"] == 1
    evals = json.loads((run / "evals.jsonl").read_text().splitlines()[0])
    assert evals["num_windows"] == 4 and evals["nll_base"] > 0
    assert "&lt;think" in (run / "samples" / "step_2.html").read_text()
    model = AutoModelForCausalLM.from_pretrained(final)
    init = AutoModelForCausalLM.from_pretrained(run / "policy_init")
    rows = slice(50257, 50265)  # the thinking rows moved: REINFORCE and the NLL reached them
    assert not torch.allclose(model.get_input_embeddings().weight[rows],
                              init.get_input_embeddings().weight[rows])
    # movement alone is weak (Adam moves any row with a gradient): the trained rows also change what the model
    # predicts after a thought, against the same model with its initial rows put back
    from thinktok.rl.parallel.rollout import sample_parallel
    from thinktok.rl.parallel.scorer import ParallelScorer

    policy = load_policy(str(final), 8, False)
    real = torch.randint(0, 50257, (2, 8), generator=torch.Generator().manual_seed(0))
    rollout = sample_parallel(policy.model, policy_mode(policy), real, 2, seed=0)
    cfg = parallel_config(run / "unused", teacher).parallel
    trained = ParallelScorer(cfg, policy.model, policy_mode(policy))(rollout).gain
    with torch.no_grad():
        policy.model.get_input_embeddings().weight[rows] = init.get_input_embeddings().weight[rows]
    reset = ParallelScorer(cfg, policy.model, policy_mode(policy))(rollout).gain
    assert (trained - reset).abs().max() > 1e-4
    extra = torch.load(final / "thinktok_extra.pt")
    assert ("mixing_head" in extra) == (mixing == "true")
    # `thinktok eval` knows a parallel checkpoint by its run info
    from thinktok.analysis.evaluate import evaluate

    result = evaluate(str(run), None, "test", limit=3)
    assert result["format"] == "parallel" and result["num_windows"] == 3
    assert result["mixing_head"] == (mixing == "true")
    assert result["nll_base"] > 0 and result["nll_thought"] > 0 and result["thought_len"] == 2


def test_parallel_resume_matches_uninterrupted(parallel_runs, tmp_path, teacher, monkeypatch):
    """The mixing head (weights, Adam state, fresh gradients each step) and the thinking rows come back from
    the checkpoint: the resumed run's numbers are the uninterrupted run's."""
    from thinktok.rl.parallel.learner import ParallelRun

    whole = parallel_runs("policy", "true")
    for key, value in learner_env("policy").items():  # as the uninterrupted run
        monkeypatch.setenv(key, value)
    # inline workers here, Ray actors in the uninterrupted run: both resume and the inline path are checked
    cut = cut_and_resumed(tmp_path / "cut",
                          lambda d: scored_parallel_config(d, teacher, "policy", "true", "ray.inline=true"),
                          ParallelRun, monkeypatch, STEPS["policy"])
    for x, y in zip(metrics(whole), metrics(cut), strict=True):
        for key in ("reward_mean", "loss", "gain_mean", "nll_thought"):
            assert x[key] == pytest.approx(y[key], abs=1e-6), (x["step"], key)
    ha = torch.load(whole / "trainer" / "checkpoint-4" / "thinktok_extra.pt")["mixing_head"]
    hb = torch.load(cut / "trainer" / "checkpoint-4" / "thinktok_extra.pt")["mixing_head"]
    assert all(torch.allclose(ha[k], hb[k], atol=1e-6) for k in ha) and ha["net.2.weight"].abs().sum() > 0


def policy_mode(policy):
    from thinktok.models.thought_config import SamplingConfig, ThoughtConfig
    from thinktok.models.thought_modes import make_mode

    return make_mode(ThoughtConfig(mode="vocab", num_thinking=8), policy.vocab, SamplingConfig())


class Scribbler:
    """A worker whose call changes its argument in place, draws from the global generator, reports its
    thread count and returns its own state; or fails."""

    def __init__(self, device: str, threads: int = 1):
        torch.set_num_threads(threads)
        self.kept = {"calls": 0}

    def score(self, rows: list[dict], fail: bool = False) -> tuple[list[dict], int, dict]:
        if fail:
            raise PoisonedStep("reward gold_loglik is nan for rollout 1")
        rows[0]["x"] = 99
        self.kept["calls"] += 1
        torch.rand(1)
        return rows, torch.get_num_threads(), self.kept


def test_inline_workers_behave_as_actors(two_threads):
    """ray.inline: a call gets copies (the caller's rows stay) and returns copies (the caller's change of a
    result stays), runs on an actor's one thread, leaves the learner's thread count and random state as they
    were, and its error surfaces where an actor's does, at `get`."""
    from thinktok.rl.actors import InlineWorker, Publisher, Workers, get

    threads, random_state = two_threads, torch.random.get_rng_state()
    worker = InlineWorker(Scribbler, ("cpu",))
    rows = [{"x": 1}]
    ((changed, inside, kept),) = get([worker.score.remote(rows)])
    assert changed == [{"x": 99}] and rows == [{"x": 1}] and inside == 1
    assert torch.get_num_threads() == threads and torch.equal(torch.random.get_rng_state(), random_state)
    kept["calls"] = 100
    assert get([worker.score.remote(rows)])[0][2] == {"calls": 2}
    assert get([copy.deepcopy(worker).score.remote(rows)])[0][2] == {"calls": 3}  # a copy is a worker too
    failed = worker.score.remote(rows, fail=True)  # no raise yet
    with pytest.raises(PoisonedStep, match="^scoring failed at step 4: reward gold_loglik is nan"):
        Collector.get_scores([failed], 4)
    module = torch.nn.Linear(2, 1)
    (published,) = Publisher(Workers([worker], []))({"model": module}, 0)
    # the module's own tensors, not a Ray ObjectRef or a copy, shared by the copies of a call's arguments
    assert published["model"]["weight"].data_ptr() == module.weight.data_ptr()
    assert copy.deepcopy([published])[0] is published


def test_published_deltas_bring_any_worker_to_the_version():
    """Actors get a base and, per version, the rows that moved from it: a worker one version behind, one
    several behind whose rows moved and moved back, and a fresh one of other weights all end with the
    learner's exact state; a new base once half the embedding rows moved."""
    from thinktok.rl.actors import Publisher, VersionedWeights, Workers

    init_ray(RayConfig())
    learner = load_policy("tiny", 4, False, seed=0).model
    workers = {name: load_policy("tiny", 4, False, seed=seed).model for name, seed in
               (("steady", 0), ("behind", 0), ("fresh", 3))}
    loaders = {name: VersionedWeights({"model": m}) for name, m in workers.items()}
    publish = Publisher(Workers(["an actor"], []))
    wte, block = learner.transformer.wte.weight, learner.transformer.h[0].mlp.c_fc.weight
    base_row = wte[5].detach().clone()

    def check(names, version):
        weights = publish({"model": learner}, version)
        for name in names:
            loaders[name].load(weights, version)
            for k, v in workers[name].state_dict().items():
                assert torch.equal(v, learner.state_dict()[k]), (name, version, k)

    check(["steady", "behind"], 0)
    with torch.no_grad():
        wte[5] += 1.0
        wte[7] -= 0.5
        block.mul_(1.1)
    check(["steady"], 1)
    with torch.no_grad():
        wte[5] = base_row  # back to its base value: "steady" holds version 1's row 5
        wte[9] += 2.0
    check(["steady", "behind", "fresh"], 2)
    assert publish.base_version == 0
    with torch.no_grad():
        wte[: len(wte) // 2 + 1] += 0.1
    check(["steady", "behind"], 3)
    check(["steady", "fresh"], 4)
    assert publish.base_version == 4


def test_config_refuses_what_the_learner_cannot_do(tmp_path, teacher):
    with pytest.raises(ValueError, match="ray.inline runs the workers in the learner's process and joins no "
                                         "cluster: drop ray.address=auto"):
        config(tmp_path, teacher, "ray.inline=true", "ray.address=auto").validate()
    with pytest.raises(ValueError, match="noise=none makes soft thoughts deterministic"):
        config(tmp_path, teacher, "thought.mode=soft", "thought.num_thinking=0",
               "thought.noise=none").validate()
    with pytest.raises(ValueError, match="rl.beta is a KL on text steps"):
        load_config(TrainConfig, PARALLEL, ["rl.beta=0.1"]).validate()


def test_parallel_config_errors(tmp_path, teacher):
    with pytest.raises(ValueError, match="scorer=teacher needs a teacher"):
        load_config(TrainConfig, PARALLEL, ["parallel.scorer=teacher", "teacher=null"]).validate()
    with pytest.raises(ValueError, match="thought.mode must be vocab or single"):
        load_config(TrainConfig, PARALLEL, ["thought.mode=continuous", "thought.num_thinking=0"]).validate()
    with pytest.raises(ValueError, match="not ppo"):
        load_config(TrainConfig, PARALLEL, ["rl.algo=ppo"]).validate()
    with pytest.raises(ValueError, match="unknown rollout"):
        load_config(TrainConfig, PARALLEL, ["rollout=diagonal"]).validate()
