"""Why: each token's signed share of a classification (occlusion, gradient x
input, integrated gradients), for classify.py --explain and the page."""
import functools
from beyond.tokens import PAD_TOKEN_ID, encode, pad_ids
import torch


IG_STEPS = 20  # integrated gradients: points on the path from a zero embedding
MAX_EXPLAINED = 16  # texts one /classify request may explain: each costs IG_STEPS passes
OCCLUSION_BATCH = 64
# token positions in one gradient pass (at least one step's): bounds its memory, and how
# long the server's between() waits there (a classification, a stop)
GRADIENT_BATCH = 2048
EXPLAIN_METHODS = {
    "occlusion": "leave one token out: how far the label's log-odds fall without it "
                 "(one forward pass per token, batched)",
    "gradient": "gradient x input: the gradient of the label's log-odds times each "
                "token's embedding (one forward and one backward pass)",
    "integrated": f"integrated gradients, {IG_STEPS} steps from a zero embedding "
                  f"({IG_STEPS} forward and backward passes, batched)"}
# the most faithful of the three on ERASER's measures, by far (bench.py --explain)
EXPLAIN_DEFAULT = "integrated"


def padded_batch(sequences, model, max_length, pad_token_id):
    """Token id lists -> (b, T), to max_length where the pooling reads it ("last")."""
    return pad_ids(sequences, pad_token_id, length=max_length if model.pool == "last" else None)


def class_logits(model, sequences, max_length, pad_token_id, between=lambda: None):
    """The logits of token id lists, (b, num_classes), batched, on the CPU."""
    device = model.gpt.tok_emb.weight.device
    rows = []
    with torch.inference_mode():
        for start in range(0, len(sequences), OCCLUSION_BATCH):
            between()
            inputs = padded_batch(sequences[start:start + OCCLUSION_BATCH], model, max_length,
                                  pad_token_id).to(device)
            rows.append(model(inputs)[:, -1, :].float().cpu())
    return torch.cat(rows)


def log_odds(logits, target):
    """log p / (1 - p) of class target from logits (..., num_classes): unlike the
    probability it does not saturate, so a token that matters still shows where
    the model is already sure."""
    others = torch.cat([logits[..., :target], logits[..., target + 1:]], dim=-1)
    return logits[..., target] - torch.logsumexp(others, dim=-1)


def without(ids, drop, pad_token_id):
    """ids less the positions in drop; nothing left reads as one padding token."""
    kept = [token for i, token in enumerate(ids) if i not in drop]
    return kept or [pad_token_id]


def occlusion_scores(model, ids, target, max_length, pad_token_id, between=lambda: None):
    """The log-odds of target for ids less those without token i, for each i."""
    variants = [ids] + [without(ids, {i}, pad_token_id) for i in range(len(ids))]
    odds = log_odds(class_logits(model, variants, max_length, pad_token_id, between), target)
    return (odds[0] - odds[1:]).tolist()


def gradient_scores(model, ids, target, max_length, pad_token_id, scales=(1.0,),
                    between=lambda: None):
    """Gradient x input: each token's embedding times the mean over `scales` of the
    gradient of target's log-odds at the embeddings scaled (the padding's unscaled),
    in passes of at most GRADIENT_BATCH positions."""
    gpt, n = model.gpt, len(ids)
    inputs = padded_batch([ids], model, max_length, pad_token_id).to(gpt.tok_emb.weight.device)
    positions = torch.arange(inputs.shape[1], device=inputs.device)
    per_pass = max(1, GRADIENT_BATCH // inputs.shape[1])
    gradient = 0
    for start in range(0, len(scales), per_pass):
        between()
        steps = torch.tensor(scales[start:start + per_pass], device=inputs.device)
        batch = inputs.expand(len(steps), -1)
        with torch.inference_mode(False), torch.enable_grad():
            embeddings = gpt.tok_emb(inputs).detach()  # (1, T, emb_dim)
            scale = torch.ones(batch.shape, device=inputs.device)
            scale[:, :n] = steps[:, None]
            scaled = (embeddings * scale[..., None]).requires_grad_()  # (steps, T, emb_dim)
            # the forward pass from the embeddings, so that gradients reach them
            with model.autocast(batch):  # --precision, as the classification's
                x = gpt.final_norm(gpt.trf_blocks(gpt.drop_emb(scaled + gpt.pos_emb(positions))))
                logits = gpt.out_head(model.pool_outputs(x, batch))
            (step_gradients,) = torch.autograd.grad(log_odds(logits.float(), target).sum(), scaled)
        gradient = gradient + step_gradients[:, :n].sum(dim=0)
    return (gradient / len(scales) * embeddings[0, :n]).sum(dim=-1).tolist()


# integrated gradients: the midpoint rule on the straight path from a zero embedding
SCORERS = {"occlusion": occlusion_scores, "gradient": gradient_scores,
           "integrated": functools.partial(gradient_scores, scales=[
               (step + 0.5) / IG_STEPS for step in range(IG_STEPS)])}


def explain_ids(model, ids, max_length, pad_token_id=PAD_TOKEN_ID, method=EXPLAIN_DEFAULT,
                target=None, between=lambda: None):
    """(class explained (default: the predicted one), a signed score per token toward it);
    between() runs before each batch of passes: the server's pause, or its stop."""
    model.eval()
    if target is None:
        target = int(class_logits(model, [ids], max_length, pad_token_id)[0].argmax())
    return target, SCORERS[method](model, ids, target, max_length, pad_token_id,
                                   between=between)


def token_pieces(ids, scores, tokenizer):
    """[{"token", "score"}] whose tokens join to the decoded message: tokens that
    split one character's UTF-8 bytes are merged, their scores summed."""
    pieces, pending, total = [], b"", 0.0
    for i, (token, score) in enumerate(zip(ids, scores), 1):
        pending += tokenizer.decode_single_token_bytes(token)
        total += score
        try:  # the last token's cut character (truncation) decoded as tokenizer.decode does
            text = pending.decode("utf-8", errors="replace" if i == len(ids) else "strict")
        except UnicodeDecodeError:  # a character continues in the next token
            continue
        pieces.append({"token": text, "score": round(total, 6)})
        pending, total = b"", 0.0
    return pieces


def explain_texts(texts, targets, model, tokenizer, max_length, pad_token_id=PAD_TOKEN_ID,
                  method=EXPLAIN_DEFAULT, between=lambda: None):
    """Each text's token pieces with their scores toward its class in targets."""
    max_length = min(max_length, model.gpt.pos_emb.weight.shape[0])
    explanations = []
    for text, target in zip(texts, targets):
        ids = encode(text, tokenizer, max_length)
        _, scores = explain_ids(model, ids, max_length, pad_token_id, method, target, between)
        explanations.append(token_pieces(ids, scores, tokenizer))
    return explanations


def add_explain_options(parser):
    parser.add_argument("--explain", action="store_true",
                        help="also show each token's signed share of the label (positive: "
                             "toward it): on a terminal the message coloured token by token, "
                             "then the tokens that pushed most toward the label")
    parser.add_argument("--explain-method", default=EXPLAIN_DEFAULT,
                        choices=list(EXPLAIN_METHODS),
                        help="with --explain, how the shares are computed (default: "
                             "%(default)s, the most faithful here): " + "; ".join(
                                 f"{k}: {v}" for k, v in EXPLAIN_METHODS.items()))
