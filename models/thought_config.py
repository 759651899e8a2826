"""What a thought mode is configured by: `ThoughtConfig` (which mode, how many thinking tokens, where
thoughts go, each mode's settings) and `SamplingConfig` (how a rollout decodes). Light: configs, checkpoints
and the CLI read them without building a model."""

from __future__ import annotations

from dataclasses import dataclass

from thinktok.errors import UserError

MODES = ("none", "vocab", "single", "continuous", "soft", "pause")
ENGINES = ("dynamic", "compiled")


@dataclass
class SamplingConfig:
    temperature: float = 1.0  # for text tokens (and discrete thinking tokens)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    max_new_tokens: int = 32  # real (text) tokens per rollout
    stop_at_eos: bool = True  # end a rollout at its first text EOS
    greedy: bool = False  # argmax tokens, noiseless continuous/soft thoughts (evaluation)
    # how RL's rollout workers decode (the same draws either way): dynamic (a growing KV cache) | compiled (a
    # preallocated cache, each step through torch.compile; CUDA graphs on a GPU). Compiling costs seconds per
    # worker, once; docs/benchmarks.md says where it pays
    engine: str = "dynamic"

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise UserError(f"unknown sampling.engine {self.engine!r}: expected {' or '.join(ENGINES)}")
        if self.temperature <= 0:
            raise UserError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise UserError(f"top_k must be >= 0 and top_p in (0, 1], got {self.top_k}, {self.top_p}")
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class ThoughtConfig:
    mode: str = "vocab"  # none | vocab | single | continuous | soft | pause (docs/thought-modes.md)
    # vocab: distinct <think_i> tokens; pause: 1 = one shared embedding, k = k distinct
    num_thinking: int = 64
    max_thought_tokens: int = 32  # budget per rollout (continuous without learned stop: exact count)
    # fixed thought slots: > 0 = exactly `slots` thought steps the policy fills with content of its choosing,
    # after the prompt (vocab: or before every text token, slots_at=every), so the decision to think cannot
    # collapse; 0 = free placement (vocab: the policy decides when, up to max_thought_tokens)
    slots: int = 0
    slots_at: str = "prompt"  # prompt | every (vocab only)
    init: str = "mean"  # initialisation of the new rows: mean | norm
    # continuous (Coconut)
    sigma: float = 0.1  # Gaussian exploration around the fed-back hidden state; 0 = deterministic
    learn_sigma: bool = False  # learn sigma (log-parametrised) with the policy
    learned_stop: bool = False  # stop when the policy samples <eot>; else exactly max_thought_tokens thoughts
    # soft (Soft Thinking)
    soft_top_k: int = 10  # 0 = the full text vocabulary
    soft_temperature: float = 1.0  # temperature of the mixture weights over the top-k tokens
    noise: str = "gumbel"  # none | gumbel | dirichlet
    gumbel_tau: float = 0.5  # Gumbel-softmax temperature (noise=gumbel)
    dirichlet_alpha: float = 1.0  # Dirichlet concentration scale: w ~ Dir(alpha * p) (noise=dirichlet)
    cold_stop_entropy: float = 0.01  # cold stop: entropy threshold of the mixture (nats)
    cold_stop_steps: int = 256  # cold stop: consecutive low-entropy steps that end thinking
    # continuous/soft: a vector step's log-density is a sum over D (or k) dimensions, +100 nats and a gradient
    # 15-400x a token's on the tiny model; per_dim divides it by its dimension (D, or k-1 on the simplex) so a
    # vector step weighs like a token step in the loss and the clip. joint: the full density.
    density_scale: str = "per_dim"
    # pause
    num_pause: int = 4
    pause_at: str = "prompt"  # prompt: k pauses after the prompt | every: k pauses before every text token

    @property
    def budget(self) -> int:
        """Thought steps per rollout at most (exactly, with slots)."""
        return self.slots or self.max_thought_tokens

    @property
    def every(self) -> bool:
        """Thoughts inserted before every text token (pause_at=every, or vocab slots_at=every): the
        gold-answer rewards and the latent term repeat the opening block before every gold token, as the
        policy sees it."""
        pause_every = self.mode == "pause" and self.pause_at == "every"
        return pause_every or (self.slots > 0 and self.slots_at == "every")

    @property
    def markers(self) -> bool:
        return self.mode in ("continuous", "soft")

    @property
    def vocab_tokens(self) -> int:
        """Thinking tokens this mode needs in the vocabulary."""
        # none: 0
        return {"vocab": self.num_thinking, "single": 1, "pause": self.num_thinking}.get(self.mode, 0)

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"unknown thought mode {self.mode!r}: expected one of {', '.join(MODES)}")
        for name in ("num_thinking", "max_thought_tokens", "slots", "num_pause", "soft_top_k",
                     "cold_stop_steps"):
            if getattr(self, name) < 0:
                raise UserError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.mode in ("vocab", "pause") and self.num_thinking < 1:
            raise UserError(f"mode {self.mode} needs num_thinking >= 1, got {self.num_thinking}")
        if self.mode == "single" and self.num_thinking not in (1, ThoughtConfig.num_thinking):
            raise UserError(f"mode single has exactly one thinking token (got "
                             f"num_thinking={self.num_thinking}); use mode vocab for k distinct tokens")
        if self.density_scale not in ("per_dim", "joint"):
            raise UserError(f"unknown density_scale {self.density_scale!r}: expected per_dim or joint")
        if self.learned_stop and self.mode != "continuous":
            raise UserError(f"learned_stop is a continuous-mode option (mode {self.mode} stops by its own "
                             f"rule): set learned_stop: false")
        if self.noise not in ("none", "gumbel", "dirichlet"):
            raise UserError(f"unknown soft noise {self.noise!r}: expected none, gumbel or dirichlet")
        if self.slots:
            if self.mode in ("none", "pause"):
                raise UserError(f"thought.slots is for modes that choose a thought's content (vocab, "
                                 f"continuous, soft); mode {self.mode} has none: use num_pause for "
                                 "fixed pauses")
            if self.mode == "single":
                raise UserError("mode single with slots has no content to choose (one token): it is mode "
                                 "pause with num_thinking=1")
            if self.learned_stop:
                raise UserError("thought.slots fixes the number of thoughts: set learned_stop: false")
        if self.slots_at not in ("prompt", "every"):
            raise UserError(f"unknown slots_at {self.slots_at!r}: expected prompt or every")
        if self.slots_at == "every" and self.mode != "vocab":
            raise UserError(f"slots_at=every is for mode vocab; {self.mode} thoughts sit after the prompt")
        if self.pause_at not in ("prompt", "every"):
            raise UserError(f"unknown pause_at {self.pause_at!r}: expected prompt or every")
        if self.sigma < 0 or (self.sigma == 0 and self.learn_sigma):
            raise UserError(f"sigma must be > 0 (or 0 without learn_sigma), got {self.sigma}")
        if self.gumbel_tau <= 0 or self.dirichlet_alpha <= 0 or self.soft_temperature <= 0:
            raise UserError("gumbel_tau, dirichlet_alpha and soft_temperature must be > 0")


def check_trainable(cfg: ThoughtConfig, sampling: SamplingConfig) -> None:
    """Settings whose thoughts no RL gradient can reach (fine for sampling and SFT, refused for RL): a thought
    with log-prob 0 and a deterministic value still counts in the loss normaliser and learns nothing."""
    if sampling.greedy:
        raise UserError("sampling.greedy is for evaluation: RL needs sampled actions with log-probs")
    if cfg.mode == "continuous" and cfg.sigma == 0:
        raise UserError("thought.sigma=0 makes continuous thoughts deterministic (log-prob 0): RL cannot "
                         "train them; set sigma > 0 (optionally learn_sigma)")
    if cfg.mode == "soft" and cfg.noise == "none":
        raise UserError("thought.noise=none makes soft thoughts deterministic (log-prob 0): RL cannot train "
                         "them; use gumbel or dirichlet")
    if cfg.mode == "soft" and cfg.soft_top_k == 0:
        raise UserError("thought.soft_top_k=0 (the whole text vocabulary) would record 50k ids and weights "
                         "per soft step for the learner; set soft_top_k (Soft Thinking uses 10-20)")
    if cfg.mode == "soft" and cfg.soft_top_k == 1:
        raise UserError("thought.soft_top_k=1 gives a one-point mixture with no density: set "
                         "soft_top_k >= 2")
