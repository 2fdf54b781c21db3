"""--precision: bfloat16 or float16 matrix products (torch.autocast per pass),
where the device runs them; float16's loss scaling."""
from beyond.cli import InputError
import torch
import warnings


class LossScaledOptimizer:
    """The optimizer as listing 6.10 calls it, stepped through a GradScaler: float16's small
    gradients underflow to 0 unless scaled up (the classifier's grad_scaler); step() divides
    the scale out, skips a step whose gradients overflowed and adjusts the scale."""

    def __init__(self, optimizer, scaler):
        self.optimizer, self.scaler = optimizer, scaler

    def zero_grad(self):
        self.optimizer.zero_grad()

    def step(self):
        self.scaler.step(self.optimizer)
        self.scaler.update()


def loss_scaled(optimizer, model, device):
    """The optimizer for --precision fp16, and the classifier's scaler set."""
    scaler = torch.amp.GradScaler(device.type) if hasattr(torch.amp, "GradScaler") \
        else torch.cuda.amp.GradScaler()  # before torch 2.3
    while hasattr(model, "module"):  # torchrun: inside WholeBatches(DistributedDataParallel)
        model = model.module
    model.grad_scaler = scaler
    return LossScaledOptimizer(optimizer, scaler)


PRECISIONS = {  # --precision: the dtype of the matrix products (None: the weights' own)
    "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision, device):
    """--precision on this device, or an error naming what it can run. fp16 is cuda only: a CPU
    without float16 matrix units runs it several times slower than fp32; mps is unverified."""
    if precision == "fp32":
        return
    can = ["fp32"]
    if device.type == "cpu" or (device.type == "mps" and autocasts(device, torch.bfloat16)) \
            or (device.type == "cuda" and cuda_has_bf16()):
        can.append("bf16")
    if device.type == "cuda":
        can.append("fp16")
    if precision not in can:
        raise InputError(f"--precision {precision} does not run on --device {device.type} "
                         f"here; it can run {' or '.join(can)}.")


def cuda_has_bf16():
    try:  # torch >= 2.4 counts emulated bfloat16 (a T4's, slower than fp32) unless told not to
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:
        return torch.cuda.is_bf16_supported()


def autocasts(device, dtype):
    """Whether torch.autocast runs dtype on device; where it cannot, it warns and does nothing."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.autocast(device.type, dtype=dtype):
                x = torch.ones(2, 2, device=device)
                return (x @ x).dtype == dtype
    except (RuntimeError, UserWarning):
        return False


def add_precision_option(parser):
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                        help="the matrix products' precision: fp32 (the chapter); bf16, "
                             "bfloat16 mixed precision (torch.autocast; on a CPU with "
                             "avx512_bf16, measured: fine-tuning 1.4-1.8x faster, classify.py "
                             "1.7-2.1x the messages/s; slower where a CPU lacks bfloat16 "
                             "units; probabilities within about 0.02 of fp32's, so a message "
                             "near 0.5 may change label; the weights, and a fine-tune's "
                             "optimizer state and checkpoint, stay float32); fp16, float16 "
                             "(CUDA only: GPUs without bfloat16, such as the T4; fine-tuning "
                             "scales the loss); any checkpoint runs in any of them "
                             "(default: %(default)s)")
