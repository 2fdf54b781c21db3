"""--trainable: which parts of the model train: the chapter's last block, final_norm and
head; appendix B's other choices, Exercise 6.2's everything, or appendix E's LoRA adapters."""
from beyond.cli import positive_float, positive_int
from beyond.lora import replace_linear_with_lora

TRAINABLE = {
    "last_layer": "only the new output layer",
    "last_block": "the last transformer block, final_norm and the new head (the chapter)",
    "last_two_blocks": "the last two transformer blocks, final_norm and the head",
    "all": "every parameter (Exercise 6.2)",
    "lora": "low-rank adapters on every Linear of the blocks, and the head (appendix E)",
}


def choose_trainable(model, trainable, lora_rank, lora_alpha):
    """The model as listing 6.7 left it (last block, final_norm, head), changed to `trainable`."""
    if trainable in ("last_layer", "lora"):
        for module in [model.trf_blocks[-1], model.final_norm]:
            module.requires_grad_(False)
    if trainable == "last_two_blocks":
        model.trf_blocks[-2].requires_grad_(True)
    if trainable == "all":
        model.requires_grad_(True)
    if trainable == "lora":  # adapters on every Linear of the blocks; they train
        replace_linear_with_lora(model.trf_blocks, lora_rank, lora_alpha)
    return model


def add_trainable_options(parser):
    parser.add_argument("--trainable", default="last_block", choices=list(TRAINABLE),
                        help="what trains: " + "; ".join(map(": ".join, TRAINABLE.items())))
    parser.add_argument("--lora-rank", type=positive_int, default=16,
                        help="rank r of the LoRA adapters (--trainable lora; appendix E)")
    parser.add_argument("--lora-alpha", type=positive_float, default=16,
                        help="LoRA scale alpha: the update is alpha/r * x A B (appendix E)")


def check_trainable_options(parser, args):
    if args.trainable != "lora" and (args.lora_rank, args.lora_alpha) != (
            parser.get_default("lora_rank"), parser.get_default("lora_alpha")):
        parser.error("--lora-rank and --lora-alpha go with --trainable lora")
