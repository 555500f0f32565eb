"""Engine responses in vLLM's formats, built from an 'engine's' logits, for the crosscheck tests."""
import numpy as np

from ref import divergence as D


def prompt_logprobs(ids, logits, k) -> list:
    """vLLM's prompt_logprobs: per prompt token (None first) the token's and the top-k's logprob and rank."""
    lp = D.log_softmax(logits)
    out = [None]
    for t in range(1, len(ids)):
        order = D.top_ids(lp[t - 1], lp.shape[1])
        rank = {int(i): r + 1 for r, i in enumerate(order)}
        d = {str(ids[t]): {"logprob": float(lp[t - 1, ids[t]]), "rank": rank[ids[t]], "decoded_token": None}}
        for i in order[:k]:
            d.setdefault(str(int(i)), {"logprob": float(lp[t - 1, i]), "rank": rank[int(i)], "decoded_token": None})
        out.append(d)
    return out


def completion_response(ids, logits, k) -> dict:
    """A vLLM /v1/completions body with prompt_logprobs=k and return_token_ids for engine logits."""
    nxt = int(np.argmax(logits[-1]))
    return {"id": "cmpl-0", "object": "text_completion", "created": 0, "model": "tiny",
            "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length", "stop_reason": None,
                         "token_ids": [nxt], "prompt_logprobs": prompt_logprobs(ids, logits, k),
                         "prompt_token_ids": list(ids)}],
            "usage": {"prompt_tokens": len(ids), "total_tokens": len(ids) + 1, "completion_tokens": 1}}


def chat_response(ids, logits, k) -> dict:
    """A vLLM /v1/chat/completions body with prompt_logprobs=k and return_token_ids."""
    return {"id": "chatcmpl-0", "object": "chat.completion", "created": 0, "model": "tiny",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": "length", "token_ids": [int(np.argmax(logits[-1]))]}],
            "prompt_logprobs": prompt_logprobs(ids, logits, k), "prompt_token_ids": [int(i) for i in ids]}
