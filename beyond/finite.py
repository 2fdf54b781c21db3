"""Non-finite is an error: weights that hold NaN or infinity are refused when they
load, and a fine-tune whose outputs stop being finite numbers (a learning rate too
high, a precision too low) stops at that step with one error, publishing nothing."""
from beyond.cli import InputError
import torch


def check_finite_weights(model, source):
    """Once, when weights have loaded: NaN or infinity in them is an error naming them."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise InputError(f"{source}: {name} holds NaN or infinite values: the weights "
                             f"are damaged.")


def refuse_non_finite_outputs(model, source):
    """gpt.py's continuation: logits that are not finite numbers are an error, not text."""
    def check(module, inputs, output):
        if not torch.isfinite(output).all():
            raise InputError(f"{source}: the model's logits are not all finite numbers (NaN "
                             f"or infinity): the weights are damaged or out of range.")
    model.register_forward_hook(check)


def stops_if_diverged(model, steps_per_epoch, args):
    """From section 6.6 on: a forward pass of the model whose outputs are not finite
    numbers (a loss about to be NaN, in training or in an evaluation) ends the run with an
    error naming the epoch and step, before that loss is printed or stepped on."""
    trained = [-1]  # the step being trained: one training forward pass each

    def check(module, inputs, output):
        trained[0] += module.training  # an evaluation is named after the step it follows
        step = trained[0]
        if torch.isfinite(output).all():
            return
        if step < 0 or (step == 0 and module.training):  # no update yet: not the --lr
            raise InputError("the model's outputs are not finite numbers (NaN or infinity) "
                             "before any training step: the weights are out of range"
                             + (", or --precision is too low" if args.precision != "fp32"
                                else "") + "; nothing of this run is saved.")
        raise InputError(
            f"training diverged in epoch {step // steps_per_epoch + 1}, at step "
            f"{step:06d}: the model's outputs are no longer finite numbers (NaN or "
            f"infinity), so nothing of this run is saved. Lower --lr (now {args.lr:g})"
            + (", or train in --precision fp32" if args.precision != "fp32" else "")
            + ", and check that the weights are the ones meant.")

    model.register_forward_hook(check)
