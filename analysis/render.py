"""Annotated rollouts for people: terminal text (rich), a self-contained HTML page, and JSONL records.

Prompt, generated text and thought steps get three distinct colours. Discrete thinking tokens show as
`<think1442>`; continuous and soft thoughts show as a marker with their nearest text tokens
(`<cont: the|a|an>`, `<soft: the|a|an>`).
"""

from __future__ import annotations

import html
import json

import torch
import torch.nn.functional as F
from rich.text import Text
from transformers import PreTrainedTokenizerBase

from thinktok.models.thoughts import Action
from thinktok.rl.rollout import Rollout

from .format import html_page

STYLES = {"prompt": "bold white", "text": "cyan", "thought": "bold magenta"}
CSS_COLOURS = {"prompt": "#222", "text": "#0a6ebd", "thought": "#c2185b"}


def nearest_tokens(vectors: torch.Tensor, embedding: torch.Tensor, text_size: int,
                   k: int = 3) -> torch.Tensor:
    """Top-k text tokens by cosine similarity: (N, D) vectors, (V, D) table -> (N, k) ids."""
    sim = F.normalize(vectors.float(), dim=-1) @ F.normalize(embedding[:text_size].float(), dim=-1).T
    return sim.topk(k, dim=-1).indices


def step_records(r: Rollout, tokenizer: PreTrainedTokenizerBase,
                 embedding: torch.Tensor | None = None) -> list[dict]:
    """One dict per generated step: kind, token_id (None for vector/soft thoughts), text, logprob; with
    `embedding`, a thinking token's step also gets `nearest`, the 3 nearest text tokens of its row."""
    near = {}  # step -> nearest text ids of what it fed: a vector, or a thinking token's embedding row
    if embedding is not None:
        table = embedding.detach().cpu()
        vec = (r.action == Action.VECTOR).nonzero()[:, 0]
        if r.vector is not None and len(vec):
            ids = nearest_tokens(r.vector[vec], table, r.text_size)
            near = {int(s): ids[i].tolist() for i, s in enumerate(vec)}
        think = (r.token >= r.text_size).nonzero()[:, 0]
        if len(think):
            ids = nearest_tokens(table[r.token[think]], table, r.text_size)
            near.update({int(s): ids[i].tolist() for i, s in enumerate(think)})
    out = []
    for s, (kind, tok, lp) in enumerate(zip(r.kinds, r.token.tolist(), r.logprob.tolist())):
        action = int(r.action[s])
        if action == Action.SOFT:
            top = r.soft_ids[s][r.soft_w[s].argsort(descending=True)[:3]].tolist()
            text = "<soft: " + "|".join(tokenizer.decode([t]).strip() for t in top) + ">"
        elif action == Action.VECTOR:
            text = "<cont: " + "|".join(tokenizer.decode([t]).strip() for t in near.get(s, [])) + ">"
        else:
            text = tokenizer.decode([tok])
        rec = {"kind": kind, "token_id": None if tok < 0 else tok, "text": text, "logprob": lp}
        if tok >= r.text_size and s in near:
            rec["nearest"] = [tokenizer.decode([t]) for t in near[s]]
        out.append(rec)
    return out


def to_json(r: Rollout, tokenizer, embedding=None) -> dict:
    return {
        "prompt": tokenizer.decode(r.prompt_ids),
        "mode": r.mode,
        "steps": step_records(r, tokenizer, embedding),
        "text_only": tokenizer.decode(r.text_ids),
        "num_text": r.num_text,
        "num_thought": r.num_thought,
        "weight_version": r.weight_version,
    }


def to_rich(record: dict) -> Text:
    text = Text(record["prompt"], style=STYLES["prompt"])
    for step in record["steps"]:
        text.append(step["text"], style=STYLES[step["kind"]])
    return text


def to_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(rec) + "\n" for rec in records)


def logprob_title(step: dict) -> str:
    return "" if step["logprob"] is None else f' title="logprob {step["logprob"]:.3f}"'


def to_html(records: list[dict], title: str = "thinktok rollouts") -> str:
    css = "".join(f".{k}{{color:{c}}}" for k, c in CSS_COLOURS.items())
    body = []
    for i, rec in enumerate(records):
        spans = [f'<span class="prompt">{html.escape(rec["prompt"])}</span>']
        spans += [f'<span class="{s["kind"]}"{logprob_title(s)}>{html.escape(s["text"])}</span>'
                  for s in rec["steps"]]
        body.append(f'<div class="rollout"><h3>sample {i} · {rec["mode"]} · {rec["num_text"]} text, '
                    f'{rec["num_thought"]} thought steps</h3><pre>{"".join(spans)}</pre></div>')
    legend = " ".join(f'<span class="{k}">{k}</span>' for k in CSS_COLOURS)
    style = f"body{{font-family:sans-serif;margin:2em}}pre{{white-space:pre-wrap;font-size:14px}}{css}" \
            ".thought{font-weight:bold}"
    return html_page(title, f"<h2>{html.escape(title)}</h2><p>{legend}</p>{''.join(body)}", style)


def parallel_to_json(real: torch.Tensor, thoughts: torch.Tensor, logprob: torch.Tensor, tokenizer) -> dict:
    """One parallel-thought window as a rollout record: each real token (given, so no log-prob), then the
    thought sampled after it. real (T,), thoughts and logprob (T, L) -> the record `to_html`/`to_jsonl`
    take."""
    steps = []
    for tok, thought, lps in zip(real.tolist(), thoughts.tolist(), logprob.tolist()):
        steps.append({"kind": "text", "token_id": tok, "text": tokenizer.decode([tok]), "logprob": None})
        steps += [{"kind": "thought", "token_id": t, "text": tokenizer.decode([t]), "logprob": lp}
                  for t, lp in zip(thought, lps)]
    return {"prompt": "", "mode": "parallel", "steps": steps, "text_only": tokenizer.decode(real.tolist()),
            "num_text": len(real), "num_thought": thoughts.numel(), "weight_version": 0}
