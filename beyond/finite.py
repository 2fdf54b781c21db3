"""Non-finite is an error: weights that hold NaN or infinity are refused when they
load, and a fine-tune whose weights stop being finite numbers (a learning rate too
high, a precision too low) stops at that step with one error, publishing nothing."""
from beyond.cli import InputError
import torch



def all_finite(tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def check_finite_weights(model, source):
    """Once, when weights have loaded: NaN or infinity in them is an error naming them."""
    for name, param in model.named_parameters():
        if not all_finite([param]):
            raise InputError(f"{source}: {name} holds NaN or infinite values: the weights "
                             f"are damaged.")


class StopsIfDiverged:
    """The optimizer as listing 6.10 calls it (zero_grad, step); after each step the
    trained weights are checked, and weights that stopped being finite end the run
    with an error naming the epoch and step, before anything is evaluated or saved."""

    def __init__(self, optimizer, params, steps_per_epoch, hint):
        self.optimizer, self.params = optimizer, params
        self.steps_per_epoch, self.hint, self.global_step = steps_per_epoch, hint, 0

    def zero_grad(self):
        self.optimizer.zero_grad()

    def step(self):
        self.optimizer.step()
        if not all_finite(self.params):
            epoch, step = self.global_step // self.steps_per_epoch + 1, self.global_step
            raise InputError(f"training diverged in epoch {epoch}, at step {step:06d}: the "
                             f"weights are no longer finite numbers (NaN or infinity), so "
                             f"nothing of this run is saved. {self.hint}")
        self.global_step += 1


def stops_if_diverged(optimizer, model, steps_per_epoch, args):
    """The optimizer for listing 6.10, wrapped so that a diverging run stops."""
    hint = (f"Lower --lr (now {args.lr:g})"
            + (", or train in --precision fp32" if args.precision != "fp32" else "")
            + ", and check that the weights are the ones meant.")
    params = [p for p in model.parameters() if p.requires_grad]
    return StopsIfDiverged(optimizer, params, steps_per_epoch, hint)
