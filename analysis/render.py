"""Annotated rollouts for people: terminal text (rich), a self-contained HTML page, and JSONL records.

Prompt, generated text and thought steps get three distinct colours. Discrete thinking tokens show as
`<think1442>` (with a known code, `<think3>=7`); continuous and soft thoughts show as a marker with their
nearest text tokens (`<cont: the|a|an>`, `<soft: the|a|an>`). Records annotated by analysis/annotate.py
(right or wrong, gold answer, reward and terms, group and advantage) show them above each rollout; the HTML
page filters by right/wrong and sorts by reward, advantage or group, and every step's log-prob and
probability are on hover (and in the JSONL).
"""

from __future__ import annotations

import html
import json
import math

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
    """One dict per generated step: kind, token_id (None for vector/soft thoughts), text, logprob, prob (of
    the step as sampled: exp(logprob); 1 for a forced step); with
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
        rec = {"kind": kind, "token_id": None if tok < 0 else tok, "text": text, "logprob": lp,
               "prob": math.exp(lp)}
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


def verdict(record: dict) -> str:
    """The annotation line of a record: `right · gold 408 · answer 408 · reward 1.000 (exact_match 1.000) ·
    group 0, advantage +0.866`; empty for a record without annotations."""
    parts = []
    if "correct" in record:
        parts += ["right" if record["correct"] else "wrong", f"gold {record['gold']}",
                  f"answer {record['answer']!r}"]
    if "reward" in record:
        terms = ", ".join(f"{k} {v:.3f}" for k, v in record.get("terms", {}).items())
        parts.append(f"reward {record['reward']:.3f}" + (f" ({terms})" if terms else ""))
    if "group" in record:
        adv = f", advantage {record['advantage']:+.3f}" if "advantage" in record else ""
        parts.append(f"group {record['group']}{adv}")
    return " · ".join(parts)


def step_text(step: dict) -> str:
    """What a step shows: its text, and a thinking token's code when one is known (`<think3>=7`)."""
    return step["text"] + (f"={step['code']['value']}" if "code" in step else "")


def step_title(step: dict) -> str:
    """The hover text of a step: log-prob, probability, and a code's purity and evidence."""
    out = [] if step["logprob"] is None else [f"logprob {step['logprob']:.3f}, p {step['prob']:.3f}"]
    if "code" in step:
        c = step["code"]
        out.append(f"stands for {c['candidate']} = {c['value']} (purity {c['purity']:.2f} over {c['n']} "
                   f"uses; position NMI {c['nmi']:.2f}, chance {c['chance']:.2f})")
    return f' title="{html.escape("; ".join(out))}"' if out else ""


def to_rich(record: dict) -> Text:
    text = Text(record["prompt"], style=STYLES["prompt"])
    for step in record["steps"]:
        text.append(step_text(step), style=STYLES[step["kind"]])
    return text


def to_jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(rec) + "\n" for rec in records)


# filter by right/wrong and sort by a data attribute, in the page itself (no server, no library)
SCRIPT = """
function show(which){document.querySelectorAll('.rollout').forEach(d=>{
  d.style.display=(which==='all'||d.dataset.correct===which)?'':'none';});}
function order(key){const box=document.getElementById('rollouts');
  [...box.children].sort((a,b)=>key==='group'?a.dataset.group-b.dataset.group||a.dataset.index-b.dataset.index
    :(b.dataset[key]||0)-(a.dataset[key]||0)).forEach(d=>box.appendChild(d));}
"""


def to_html(records: list[dict], title: str = "thinktok rollouts") -> str:
    css = "".join(f".{k}{{color:{c}}}" for k, c in CSS_COLOURS.items())
    body = []
    for i, rec in enumerate(records):
        spans = [f'<span class="prompt">{html.escape(rec["prompt"])}</span>']
        spans += [f'<span class="{s["kind"]}"{step_title(s)}>{html.escape(step_text(s))}</span>'
                  for s in rec["steps"]]
        data = {"index": i, "correct": {True: "right", False: "wrong"}.get(rec.get("correct"), "unknown"),
                **{k: rec[k] for k in ("reward", "advantage", "group") if k in rec}}
        attrs = " ".join(f'data-{k}="{html.escape(str(v))}"' for k, v in data.items())
        line = verdict(rec)
        body.append(f'<div class="rollout {data["correct"]}" {attrs}><h3>sample {i} · {rec["mode"]} · '
                    f'{rec["num_text"]} text, {rec["num_thought"]} thought steps</h3>'
                    + (f'<p class="verdict">{html.escape(line)}</p>' if line else "")
                    + f'<pre>{"".join(spans)}</pre></div>')
    right = sum(r.get("correct") is True for r in records)
    wrong = sum(r.get("correct") is False for r in records)
    legend = " ".join(f'<span class="{k}">{k}</span>' for k in CSS_COLOURS)
    controls = (f'<p>{len(records)} rollouts, {right} right, {wrong} wrong · show '
                '<button onclick="show(\'all\')">all</button> '
                '<button onclick="show(\'right\')">right</button> '
                '<button onclick="show(\'wrong\')">wrong</button> · sort by '
                '<button onclick="order(\'reward\')">reward</button> '
                '<button onclick="order(\'advantage\')">advantage</button> '
                '<button onclick="order(\'group\')">group</button></p>')
    style = f"body{{font-family:sans-serif;margin:2em}}pre{{white-space:pre-wrap;font-size:14px}}{css}" \
            ".thought{font-weight:bold}.right .verdict{color:#2e7d32}.wrong .verdict{color:#c62828}"
    return html_page(title, f"<h2>{html.escape(title)}</h2><p>{legend}</p>{controls}<div id=\"rollouts\">"
                     f"{''.join(body)}</div><script>{SCRIPT}</script>", style)


def parallel_to_json(real: torch.Tensor, thoughts: torch.Tensor, logprob: torch.Tensor, tokenizer) -> dict:
    """One parallel-thought window as a rollout record: each real token (given, so no log-prob), then the
    thought sampled after it. real (T,), thoughts and logprob (T, L) -> the record `to_html`/`to_jsonl`
    take."""
    steps = []
    for tok, thought, lps in zip(real.tolist(), thoughts.tolist(), logprob.tolist()):
        steps.append({"kind": "text", "token_id": tok, "text": tokenizer.decode([tok]), "logprob": None,
                      "prob": None})
        steps += [{"kind": "thought", "token_id": t, "text": tokenizer.decode([t]), "logprob": lp,
                   "prob": math.exp(lp)} for t, lp in zip(thought, lps)]
    return {"prompt": "", "mode": "parallel", "steps": steps, "text_only": tokenizer.decode(real.tolist()),
            "num_text": len(real), "num_thought": thoughts.numel(), "weight_version": 0}
