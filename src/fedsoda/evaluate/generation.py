"""GSM8K: 4-shot greedy generation and exact match of the final number."""

from __future__ import annotations

import torch
from torch import nn

from fedsoda.data.gsm8k import extract_answer
from fedsoda.data.task import Example, encode_prompt, pad_id


@torch.no_grad()
def greedy_answers(model: nn.Module, tokenizer, examples: list[Example], shots_prefix: str,
                   max_tokens: int, max_new_tokens: int) -> list[str]:
    """Generated continuations (cut at the next ``Question:``) for a batch of examples."""
    prompts = [encode_prompt(tokenizer, Example(shots_prefix + e.prefix, e.context, e.suffix,
                                                e.answer, e.label), max_tokens, max_new_tokens)
               for e in examples]
    width = max(map(len, prompts))
    pad = pad_id(tokenizer)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left padding: generation continues every row
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=pad, stop_strings=["Question:"],
                         tokenizer=tokenizer)
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [text.split("Question:")[0] for text in texts]


def exact_match(generations: list[str], references: list[str]) -> list[bool]:
    return [extract_answer(g) == r for g, r in zip(generations, references, strict=True)]
