"""The text part of a study's report (a student that may think, scored by a frozen teacher on its
text; the measures are analysis/text_eval.py's):

  * a table per arm, mean ± std over seeds: reverse KL to the teacher on the student's own continuations,
    the true continuation's NLL with the arm's thoughts and under the controls, the teacher's NLL of the
    same tokens, thoughts per 100 real tokens, and where the thoughts go (mean teacher surprisal of tokens
    right after a thought and not, Spearman's rho against teacher and against student-without-thoughts
    surprisal); parallel-thought arms give their own held-out NLL with and without thoughts;
  * the placement figure: per decile of a true token's teacher surprisal, the rate of a thought right before
    it and the propensity to think there, for the arms that choose where to think;
  * `text_rollouts.html`: each arm's own continuations (first seed), every real token coloured by its
    teacher log-prob, thoughts with their id and nearest text tokens, the reward (minus the per-token KL).
"""

from __future__ import annotations

import html as h
from pathlib import Path

from matplotlib.figure import Figure

from .controls import CONTROLS
from .format import ROLLOUT_STYLE, fmt, html_page


def text_summary(evs: list[dict], seeds: list[int], stat) -> dict:
    """Over seeds: every number of the table and the pooled placement deciles; the first seed's rollouts."""
    def over(get):
        values = [get(e) for e in evs]
        return stat(values) if all(v is not None for v in values) else None

    row = {"reverse_kl": over(lambda e: e["reverse_kl"]), "nll": over(lambda e: e["nll"]),
           "teacher_nll": over(lambda e: e["teacher_nll"]),
           "thoughts_per_100": over(lambda e: e["thoughts_per_100"]),
           "after_thought_per_100": over(lambda e: e["after_thought_per_100"]),
           "controls": {c: over(lambda e, c=c: e["controls"][c]["nll"]) for c in CONTROLS
                        if all(c in e["controls"] for e in evs)}}
    for who in ("teacher", "student"):
        row[who] = {k: over(lambda e, k=k: e["placement"][who].get(k)) for k in (
            "after_thought", "after_text", "spearman", "spearman_propensity")}
    row["propensity"] = over(lambda e: e["placement"].get("propensity"))
    # free placement: the policy chooses where to think (records from before the flag: by their mode)
    row["free"] = evs[0]["placement"].get("free", evs[0].get("mode") in ("vocab", "single"))
    # deciles pooled over seeds by position (each seed's deciles hold ~equal token counts)
    per_seed = [e["placement"]["teacher"]["deciles"] for e in evs]
    width = min(len(d) for d in per_seed)
    row["deciles"] = [{"surprisal": sum(d[i]["surprisal"] for d in per_seed) / len(per_seed),
                       "rate": stat([d[i]["rate"] for d in per_seed]),
                       "propensity": stat([d[i]["propensity"] for d in per_seed])
                       if all("propensity" in d[i] for d in per_seed) else None} for i in range(width)]
    row["rollouts"], row["first_seed"] = evs[0]["rollouts"], seeds[0]
    return row


def text_section(summary: dict) -> list[str]:
    """Markdown: the table, what each column is, and the parallel arms' own numbers."""

    rows = {k: r for k, r in summary.items() if "text" in r}
    parallel = {k: r for k, r in summary.items() if "nll_thought" in r}
    if not rows:  # parallel arms of a study without text arms are in the main table
        return []
    md = ["## Thinking on real text, scored by a frozen teacher", "",
          "Held-out prefixes. Reverse KL: per token, KL(student text ‖ teacher) on the student's own "
          "continuations at temperature 1 (minus the teacher_kl reward). NLL: per token, of the true "
          "continuation forced, the arm's thoughts its own (greedy), then under the controls. "
          "Thoughts/100: non-text steps (thoughts, pauses, markers) per 100 real tokens of the own "
          "continuations; in brackets, % of true tokens right after one. Placement: "
          "mean teacher surprisal (nats) of true tokens right after a thought and not, and Spearman's ρ of "
          "'a thought came right before' against teacher and against student-without-thoughts surprisal. "
          "Propensity (free placement): mean P(a thinking token) where the policy decides whether to think "
          "before a true token, and its ρ against teacher surprisal.", "",
          "| arm | reverse KL | NLL | no thoughts | pause | shuffled | teacher NLL | thoughts/100 | "
          "surprisal after thought | after text | ρ teacher | ρ student | propensity | ρ propensity "
          "| seeds |",
          "|" + "---|" * 15]
    for name, r in rows.items():
        t, c = r["text"], r["text"]["controls"]
        md.append(f"| {name} | {fmt(t['reverse_kl'])} | {fmt(t['nll'])} | {fmt(c.get('no_thoughts'))} | "
                  f"{fmt(c.get('pause'))} | {fmt(c.get('shuffled_thoughts'))} | {fmt(t['teacher_nll'])} | "
                  f"{fmt(t['thoughts_per_100'], digits=1)} ({fmt(t['after_thought_per_100'], digits=1)}) | "
                  f"{fmt(t['teacher']['after_thought'])} | {fmt(t['teacher']['after_text'])} | "
                  f"{fmt(t['teacher']['spearman'])} | {fmt(t['student']['spearman'])} | "
                  f"{fmt(t['propensity'], digits=4)} | {fmt(t['teacher']['spearman_propensity'])} | "
                  f"{len(r['seeds'])} |")
    if parallel:
        md += ["", "Parallel thoughts (a thought before every real token), on held-out windows of the same "
               "text: NLL of the next true token(s) after the thought and without it.", "",
               "| arm | NLL with thoughts | without | seeds |", "|---|---|---|---|"]
        md += [f"| {name} | {fmt(r['nll_thought'])} | {fmt(r['nll_base'])} | {len(r['seeds'])} |"
               for name, r in parallel.items()]
    return md + [""]


def placement_figure(summary: dict, path: Path) -> Path:
    """Per teacher-surprisal decile of the true tokens: the rate of a thought right before the token (left,
    every arm that placed one) and the propensity to think there (right, free placement), per arm."""
    texts = {k: r["text"] for k, r in summary.items() if "text" in r and r["text"]["deciles"]}
    panels = (("rate", "thought right before the token (%)", "greedy decode: where it chose to think"),
              ("propensity", "P(a thinking token) where it decides (%)", "where the policy wants to think"))
    fig = Figure(figsize=(11, 4.5))
    for ax, (key, ylabel, title) in zip(fig.subplots(1, 2), panels):
        # only arms that choose where to think: a fixed opening block sits before the first token by rule
        shown = {k: t for k, t in texts.items() if t["free"] and all(d[key] is not None for d in t["deciles"])
                 and any(d[key]["mean"] for d in t["deciles"])}
        for name, t in shown.items():
            ax.errorbar([d["surprisal"] for d in t["deciles"]], [100 * d[key]["mean"] for d in t["deciles"]],
                        yerr=[100 * d[key]["std"] for d in t["deciles"]], fmt="o-", capsize=3, label=name)
        ax.set(xlabel="teacher surprisal of the true token (nats), decile means",
               ylabel=f"{ylabel}, mean ± std over seeds", title=title)
        if shown:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no arm with free placement has any", ha="center", va="center",
                    transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def colour(logprob: float) -> str:
    """Teacher log-prob -> background: green when the teacher expects the token, red when it does not."""
    x = max(0.0, min(1.0, -logprob / 8))  # 0 nats: green, 8 nats or more: red
    return f"hsl({120 * (1 - x):.0f},70%,85%)"


def text_rollouts_page(summary: dict, title: str) -> str:
    parts = []
    for name, r in summary.items():
        if "text" not in r or not r["text"]["rollouts"]:
            continue
        rows = []
        for ex in r["text"]["rollouts"]:
            spans = []
            for s in ex["steps"]:
                text = h.escape(s["text"])
                if s["kind"] == "text":
                    lp = s["teacher_logprob"]
                    spans.append(f'<span style="background:{colour(lp)}" title="teacher log-prob {lp:.2f}">'
                                 f"{text}</span>")
                else:
                    near = "|".join(t.strip() for t in s.get("nearest", []))
                    sub = f"<sub>≈{h.escape(near)}</sub>" if near else ""
                    spans.append(f'<b class="thought">{text}</b>{sub}')
            rows.append(f"<tr><td>{h.escape(ex['prompt'])}</td><td><pre>{''.join(spans)}</pre></td>"
                        f"<td>{ex['num_thought']}</td><td>{ex['reward']:.3f}</td></tr>")
        head = ("<tr><th>prompt</th><th>continuation (text coloured by the teacher's log-prob, green: "
                "expected, red: ≤ −8 nats; thoughts in bold, ≈ nearest text tokens of the row)</th>"
                "<th>thought steps</th><th>reward (− per-token KL)</th></tr>")
        parts.append(f"<h2>{h.escape(name)} (seed {r['text']['first_seed']})</h2><table>{head}{''.join(rows)}"
                     "</table>")
    body = "".join(parts) or "<p>No arm has text rollouts.</p>"
    return html_page(f"{title} text rollouts", f"<h1>{h.escape(title)}: own continuations</h1>{body}",
                     ROLLOUT_STYLE)
