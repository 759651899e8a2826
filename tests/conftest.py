"""Shared fixtures. Tests run offline on the CPU: no hub, no Ray auth tokens."""

import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs two pytest-xdist workers on two cores: each computes on one thread, and so do the
# interpreters it starts (before torch loads). Two threads a worker oversubscribed the cores: small tests
# ran ten times slower (OpenMP's waiting threads spin); for the tests that must compute on two
# (`two_threads`), waiting threads sleep (PASSIVE).
XDIST = "PYTEST_XDIST_WORKER" in os.environ
if XDIST:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels run in the interpreter; it must be on before triton loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

from thinktok.models.policy import load_policy  # noqa: E402
from thinktok.models.thought_config import SamplingConfig, ThoughtConfig  # noqa: E402
from thinktok.models.thought_modes import make_mode  # noqa: E402

torch.set_num_threads(1 if XDIST else 2)

# pytest-xdist (--dist loadfile) hands out whole files in collection order: the longest first (measured on a
# worker beside the other: 131, 118, 101 s, then 16-26 s each), so that the two workers finish together.
LONGEST_FIRST = ("test_study.py", "test_train.py", "test_multiprocess.py", "test_rollout.py",
                 "test_content.py", "test_sft.py", "test_gpu_suite.py", "test_learner.py", "test_parallel.py",
                 "test_cli.py")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: within a file, and among the short files, the order stays as collected

# One entry per mode variant the rollout tests sweep; max_thought_tokens small to keep rollouts short.
MODE_CASES = {
    "vocab": dict(mode="vocab", num_thinking=8, max_thought_tokens=4),
    "vocab-slots": dict(mode="vocab", num_thinking=8, slots=3),
    "vocab-slots-every": dict(mode="vocab", num_thinking=4, slots=1, slots_at="every"),
    "single": dict(mode="single", num_thinking=1, max_thought_tokens=4),
    "pause-every": dict(mode="pause", num_thinking=2, num_pause=2, pause_at="every"),
    "pause-prompt": dict(mode="pause", num_thinking=1, num_pause=3),
    "continuous": dict(mode="continuous", num_thinking=0, max_thought_tokens=3),
    "continuous-stop": dict(mode="continuous", num_thinking=0, learned_stop=True, max_thought_tokens=4),
    "soft-gumbel": dict(mode="soft", num_thinking=0, noise="gumbel", max_thought_tokens=3),
    "soft-dirichlet": dict(mode="soft", num_thinking=0, noise="dirichlet", max_thought_tokens=3),
    "soft-slots": dict(mode="soft", num_thinking=0, slots=2, cold_stop_steps=1, cold_stop_entropy=100.0),
    "soft-none-cold": dict(mode="soft", num_thinking=0, noise="none", cold_stop_steps=2,
                           cold_stop_entropy=10.0),
}


class RuleBase(torch.nn.Module):
    """A hand-written stand-in for a transformer: one-hot inputs in, `logits(ids seen so far)` out as the
    hidden state (the model's head is the identity), for tests whose expected numbers come from the rule.
    The KV cache holds the ids seen so far."""

    width = 0  # vocabulary size, set by the subclass

    def logits(self, seq: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, inputs_embeds, attention_mask=None, past_key_values=None, **kw):
        ids = inputs_embeds.argmax(-1)  # (B, T)
        if past_key_values is not None:
            prev = getattr(past_key_values, "rule_ids", None)
            ids = ids if prev is None else torch.cat([prev, ids], 1)
            past_key_values.rule_ids = ids
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask[:, -ids.shape[1]:].bool()
        hidden = torch.zeros(*ids.shape, self.width)
        for b in range(ids.shape[0]):
            seen = []
            for t in range(ids.shape[1]):
                if mask[b, t]:
                    seen.append(int(ids[b, t]))
                    hidden[b, t] = self.logits(seen)
        return SimpleNamespace(last_hidden_state=hidden[:, -inputs_embeds.shape[1]:])


class RuleModel(torch.nn.Module):
    """A `RuleBase` behind identity embeddings (one-hot rows) and head: what the sampler, the recompute and
    the measures call on a model."""

    def __init__(self, base: RuleBase):
        super().__init__()
        self.base_model = base
        self.embed = torch.nn.Embedding(base.width, base.width)
        with torch.no_grad():
            self.embed.weight.copy_(torch.eye(base.width))
        self.head = torch.nn.Identity()

    @property
    def device(self):
        return torch.device("cpu")

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def forward(self, inputs_embeds, attention_mask=None, **kw):  # the recompute (no cache)
        h = self.base_model(inputs_embeds, attention_mask).last_hidden_state
        return SimpleNamespace(logits=h, hidden_states=[h])


def boost_thinking(policy, scale: float = 20.0):
    """Make an untrained tiny model actually emit its thinking tokens: large rows win the softmax."""
    with torch.no_grad():
        emb = policy.model.get_input_embeddings().weight
        v = policy.vocab
        emb[v.text_size : v.text_size + v.num_thinking] *= scale


def make(case: str, max_new_tokens: int = 6, **sampling):
    cfg = ThoughtConfig(**MODE_CASES[case])
    policy = load_policy("tiny", cfg.vocab_tokens, cfg.markers, seed=0)
    if cfg.mode in ("vocab", "single"):
        boost_thinking(policy)
    mode = make_mode(cfg, policy.vocab, SamplingConfig(max_new_tokens=max_new_tokens, **sampling))
    return policy, mode


@pytest.fixture
def two_threads():
    """This process on two intra-op threads for the test, so that a worker's one thread and the restore
    of the caller's count are visible (under xdist every test process has one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(threads)


@pytest.fixture(params=list(MODE_CASES))
def case(request):
    return request.param
