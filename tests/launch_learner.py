"""`thinktok train` as tests/test_multiprocess.py launches it, alone or under `accelerate launch`, with two
test hands on the learner:

    python tests/launch_learner.py [--grads FILE] [--no-allreduce] train CONFIG key=value ...

--grads FILE     the first process saves the gradient the optimizer steps with at the first step
                 ({"model.<name>" / "<module>.<name>": tensor}: the model's and the extra modules')
--no-allreduce   DDP's gradient all-reduce replaced by a hook that keeps each process's own gradient:
                 what the test must catch
"""

import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from thinktok.cli import main
from thinktok.rl.learner import ThoughtGRPOTrainer


def keep_local(_state, bucket):
    """A DDP communication hook that communicates nothing."""
    done = torch.futures.Future()
    done.set_result(bucket.buffer())
    return done


def without_allreduce():
    init = DistributedDataParallel.__init__

    def init_then_hook(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.register_comm_hook(None, keep_local)

    DistributedDataParallel.__init__ = init_then_hook


def saving_grads(path: str):
    create = ThoughtGRPOTrainer.create_optimizer

    def create_then_hook(self, *args, **kwargs):
        opt = create(self, *args, **kwargs)
        named = {f"model.{n}": p for n, p in self.model.named_parameters()}
        named |= {f"{m}.{n}": p for m, module in self.extra_modules.items()
                  for n, p in module.named_parameters()}

        def save_first(*_):
            if self.state.global_step == 0 and self.accelerator.is_main_process:
                torch.save({n: p.grad.clone() for n, p in named.items() if p.grad is not None}, path)

        opt.register_step_pre_hook(save_first)
        return opt

    ThoughtGRPOTrainer.create_optimizer = create_then_hook


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--no-allreduce" in args:
        args.remove("--no-allreduce")
        without_allreduce()
    if "--grads" in args:
        at = args.index("--grads")
        saving_grads(args[at + 1])
        del args[at : at + 2]
    sys.exit(main(args))
