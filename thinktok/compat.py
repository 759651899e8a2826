"""Every place thinktok reaches into TRL's or transformers' private internals, and the versions it was written
against. `check_libraries` refuses other versions at start-up (`thinktok train` and `thinktok sft`, before
any model, warm start or Ray worker), naming the supported range.

TRL, pinned exactly (pyproject.toml): its GRPO internals move between releases.
  GRPOTrainer.training_step  overridden (rl/learner.py; transformers' hook): the whole step is rl/step.py's
      `rl_step`; TRL's generation and reward pipeline (_prepare_inputs, _generate_and_score_completions)
      never runs
  GRPOTrainer._compute_loss  called (rl/learner.py `objective`): TRL's clipped surrogate over our log-probs,
      advantages and loss mask. Batch keys it reads: prompt_ids, prompt_mask, completion_ids,
      completion_mask, advantages, old_per_token_logps, num_items_in_batch
  GRPOTrainer._get_per_token_logps_and_entropies  overridden (rl/learner.py): hands `_compute_loss` the
      log-probs and entropies our recompute already computed
  GRPOTrainer._metrics  appended to (rl/learner.py `log_metric`): our metrics reach TRL's logs
  trl.trainer.utils.selective_log_softmax  imported here (models/teacher.py): a gather minus a logsumexp
transformers, a tested range (TRANSFORMERS):
  Trainer._clip_grad_norm  overridden (rl/learner.py): the extra modules' parameters are clipped with the
      model's, by one norm
  Trainer._get_output_dir, Trainer._save_checkpoint  overridden (thinktok/checkpoint.py `RunTrainer`): the
      Trainer writes each checkpoint into a temporary folder that is renamed into place
  PretrainedConfig._attn_implementation  switched for one call (`attn_implementation`,
      models/parallel_gpt2.py): the parallel-thought attention backend is registered under a name of its own
  the KV-cache protocol  imitated (rl/static_sampler.py `StaticKV`): GPT-2's attention calls only `update`;
      the keyword a model's forward takes its cache by is `cache_kwarg`'s
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

from packaging.version import Version

from thinktok.errors import UserError

TRL = "1.16.0"
TRANSFORMERS = ("5.17", "5.26")  # [low, high): the GPU machine's 5.17 to this machine's 5.25
PRIVATE_HOOKS = {  # class path -> the private methods named above (_metrics is set per instance)
    "trl.GRPOTrainer": ("_compute_loss", "_get_per_token_logps_and_entropies"),
    "transformers.Trainer": ("_clip_grad_norm", "_get_output_dir", "_save_checkpoint"),
}


def check_libraries() -> None:
    """The installed TRL and transformers are versions these hooks were written against (and still have
    every private method named above), or one clear error naming the supported versions."""
    import transformers
    import trl

    low, high = TRANSFORMERS
    problems = []
    if trl.__version__ != TRL:
        problems.append(f"TRL {trl.__version__} is installed, thinktok supports TRL {TRL} only")
    if not Version(low) <= Version(transformers.__version__) < Version(high):
        problems.append(f"transformers {transformers.__version__} is installed, thinktok supports "
                        f">={low},<{high}")
    for path, names in PRIVATE_HOOKS.items():
        module, cls = path.rsplit(".", 1)
        owner = getattr(__import__(module), cls)
        problems += [f"{path}.{n} is missing" for n in names if not hasattr(owner, n)]
    if problems:
        raise UserError("thinktok overrides private methods of TRL and transformers (thinktok/compat.py): "
                        + "; ".join(problems) + f". Install the tested versions: pip install trl=={TRL} "
                        f"'transformers>={low},<{high}' (or make install, which installs constraints.txt)")


def selective_log_softmax(logits, index):
    """(..., K) logits, (...) indices -> (...) log-probs of the indexed entries (TRL's lean version)."""
    from trl.trainer.utils import selective_log_softmax as trl_selective

    return trl_selective(logits, index)


@contextmanager
def attn_implementation(config, name: str):
    """Run a model under the attention backend registered as `name`, then restore the config's own."""
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def cache_kwarg(model) -> str:
    """The name `model.forward` takes (and its output returns) the KV cache by: `cache` from transformers
    5.24 (`past_key_values`, its deprecated alias there, goes in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
