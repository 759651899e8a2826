"""A study's report: `study.json` (every number), `report.md` and `report.html` (self-contained, figures
inline), and the figures as PNG files. Everything is computed from the arms' result.json records, nothing
written by hand:

  * the results table in the form of Coconut's: per arm, held-out accuracy mean +/- std over seeds, the
    controls (no thoughts, pause, shuffled thoughts) for every arm that thinks, text tokens and thought steps
    per answer, tokens processed per answer (prompt + text + thought steps: the compute axis), wall time;
  * one paired statement per comparison the study names: the mean per-seed difference and how many seeds
    agree with its sign;
  * figures: accuracy against tokens processed per answer (the main one), thinking-row movement beside the
    shuffled-thought gap (Adam moves any row with a gradient: movement alone says nothing), the usage of
    the thinking vocabulary in the arms' answers, and the answer-change rate of each thought position's
    intervention; and the learning curves of the arms that logged evals (analysis/curves.py);
  * what the thoughts carry (analysis/content.py), per arm: interventions, pass@k, the code table's best
    pairs, the embedding view; and `rollouts.html`, each arm's annotated examples (first seed).
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: files only, no display or global state
from matplotlib.ticker import MaxNLocator

from .content import describe
from .controls import CONTROLS
from .curves import learning_curves
from .format import ROLLOUT_STYLE, fmt, html_page, mean_std
from .text_report import placement_figure, text_rollouts_page, text_section, text_summary


def summarise(records: list[dict]) -> dict:
    """arm -> its numbers over seeds (mean, std, per seed)."""
    arms: dict[str, list[dict]] = {}
    for r in records:
        arms.setdefault(r["arm"], []).append(r)
    out = {}
    for name, rs in arms.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        evs = [r["eval"] for r in rs]

        def stat(values):
            m, s = mean_std(values)
            return {"mean": m, "std": s, "values": values}

        row = {"kind": rs[0]["kind"], "mode": evs[0].get("mode"), "seeds": [r["seed"] for r in rs],
               "wall_s": stat([r["wall_s"] for r in rs])}
        if "accuracy" in evs[0]:
            row["accuracy"] = stat([e["accuracy"] for e in evs])
            row["thought_steps"] = stat([e["thought_steps_mean"] for e in evs])
            row["text_tokens"] = stat([e["text_tokens_mean"] for e in evs])
            row["tokens_per_answer"] = stat([e["prompt_tokens_mean"] + e["text_tokens_mean"]
                                             + e["thought_steps_mean"] for e in evs])
            if all("controls" in e for e in evs):
                row["controls"] = {c: stat([e["controls"][c]["accuracy"] for e in evs]) for c in CONTROLS}
            usage = [e.get("thought_usage") for e in evs]
            if all(u for u in usage):
                total = [sum(col) for col in zip(*usage)]
                row["thought_usage"] = total
                row["thought_entropy_bits"] = entropy_bits(total)
        elif "reverse_kl" in evs[0]:  # text arms (analysis/text_eval.py)
            row["text"] = text_summary(evs, row["seeds"], stat)
        else:  # parallel-thought arms: held-out NLL with and without their thoughts
            row["nll_thought"] = stat([e["nll_thought"] for e in evs])
            row["nll_base"] = stat([e["nll_base"] for e in evs])
        moved = [r["movement"]["mean"] for r in rs if r.get("movement") and r["movement"].get("num_rows")]
        if len(moved) == len(rs):
            row["row_movement"] = stat(moved)
        contents = [(r["seed"], e["content"]) for r, e in zip(rs, evs) if "content" in e]
        if contents:
            row["content"] = content_summary(contents, stat)
        out[name] = row
    return out


def content_summary(contents: list[tuple[int, dict]], stat) -> dict:
    """Over seeds: each thought position's answer-change rate and accuracy drop, pass@k; per seed: the code
    table's best pairs; the first seed's embedding view and annotated rollouts."""
    by_position: dict[int, list[dict]] = {}
    for _, c in contents:
        for e in c["interventions"]:
            if e["n"]:
                by_position.setdefault(e["position"], []).append(e)
    first_seed, first = contents[0]
    return {
        "interventions": [{"position": k, "changed": stat([e["changed"] for e in es]),
                           "drop_points": stat([e["drop_points"] for e in es]), "n": [e["n"] for e in es]}
                          for k, es in sorted(by_position.items())],
        "pass_at_k": {k: stat([c["pass_at_k"][k] for _, c in contents]) for k in first["pass_at_k"]},
        "code_pairs": {seed: c["code_table"]["top_pairs"][:3] for seed, c in contents if "code_table" in c},
        "embedding": first["embedding"], "rollouts": first["rollouts"], "first_seed": first_seed,
        "num_examples": first["num_examples"]}


def entropy_bits(counts: list[int]) -> float:
    n = sum(counts)
    return sum(c / n * math.log2(n / c) for c in counts if c)  # log2(n / c) >= 0: never prints "-0.00"


PAIRED = {"accuracy": (100, "points", 1), "reverse_kl": (1, "nats/token of reverse KL", 3),
          "nll": (1, "nats/token of true-continuation NLL", 3)}  # metric -> scale, unit, digits


def paired(records: list[dict], a: str, b: str, metric: str = "accuracy") -> dict | None:
    """a vs b over the seeds both finished: mean difference in `metric` and how many seeds agree."""
    scale, unit, digits = PAIRED[metric]
    acc = {(r["arm"], r["seed"]): r["eval"].get(metric) for r in records}
    seeds = sorted(s for (arm, s) in acc if arm == a and (b, s) in acc and acc[a, s] is not None
                   and acc[b, s] is not None)
    if not seeds:
        return None
    diffs = [scale * (acc[a, s] - acc[b, s]) for s in seeds]
    mean = sum(diffs) / len(diffs)
    agree = sum((d > 0) == (mean > 0) and d != 0 for d in diffs) if mean else sum(d == 0 for d in diffs)
    return {"a": a, "b": b, "metric": metric, "mean_points": mean, "per_seed": diffs, "agree": agree,
            "seeds": len(seeds),
            "text": f"{a} vs {b}: {mean:+.{digits}f} {unit}, seeds agree {agree}/{len(seeds)}"}


def table(summary: dict) -> str:
    head = ("| arm | kind | accuracy | no thoughts | pause | shuffled | thought steps | text tokens | "
            "tokens / answer | row movement | wall s | seeds |")
    lines = [head, "|" + "---|" * 12]
    for name, r in summary.items():
        c = r.get("controls", {})
        if "accuracy" in r:
            acc = fmt(r["accuracy"])
        else:
            acc = f"NLL {fmt(r['nll_thought'])} (base {fmt(r['nll_base'])})"
        lines.append(f"| {name} | {r['kind']} | {acc} | {fmt(c.get('no_thoughts'))} | {fmt(c.get('pause'))} "
                     "| "
                     f"{fmt(c.get('shuffled_thoughts'))} | {fmt(r.get('thought_steps'), digits=2)} | "
                     f"{fmt(r.get('text_tokens'), digits=2)} | {fmt(r.get('tokens_per_answer'), digits=1)} | "
                     f"{fmt(r.get('row_movement'))} | {fmt(r['wall_s'], digits=0)} | {len(r['seeds'])} |")
    return "\n".join(lines)


def figures(summary: dict, out: Path) -> dict[str, Path]:
    paths = {}
    acc = {k: r for k, r in summary.items() if "accuracy" in r}
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for name, r in acc.items():
        ax.errorbar(r["tokens_per_answer"]["mean"], 100 * r["accuracy"]["mean"],
                    yerr=100 * r["accuracy"]["std"],
                    fmt="o", capsize=3, label=name)
    ax.set(xlabel="tokens processed per answer (prompt + text + thought steps)",
           ylabel="held-out accuracy (%), mean ± std over seeds", title="accuracy against compute per answer")
    if acc:  # beside the axes: inside, a legend covers points
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    paths["accuracy_vs_compute"] = out / "accuracy_vs_compute.png"
    fig.savefig(paths["accuracy_vs_compute"], dpi=110, bbox_inches="tight")

    rows = {k: r for k, r in acc.items() if "row_movement" in r}
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    names = list(rows)
    ax.bar(range(len(names)), [rows[n]["row_movement"]["mean"] for n in names],
           yerr=[rows[n]["row_movement"]["std"] for n in names], capsize=3, color="#0a6ebd")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("thinking rows: mean L2 distance from init")
    gap = ax.twinx()
    gaps = [100 * (rows[n]["accuracy"]["mean"] - rows[n]["controls"]["shuffled_thoughts"]["mean"])
            if "controls" in rows[n] else 0.0 for n in names]
    gap.plot(range(len(names)), gaps, "o", color="#c2185b")
    gap.set_ylabel("learned − shuffled thoughts (points)", color="#c2185b")
    ax.set_title("row movement (bars) beside whether the rows matter (dots)")
    if not names:
        ax.text(0.5, 0.5, "no arm has thinking rows", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    paths["row_movement"] = out / "row_movement.png"
    fig.savefig(paths["row_movement"], dpi=110)

    used = {k: r for k, r in acc.items() if sum(r.get("thought_usage") or [])}  # arms that used a token
    fig = Figure(figsize=(7, 1.2 + 1.6 * max(len(used), 1)))
    axes = fig.subplots(max(len(used), 1), 1, squeeze=False)[:, 0]
    for ax, (name, r) in zip(axes, used.items()):
        counts = r["thought_usage"]
        ax.bar(range(len(counts)), counts, color="#c2185b")
        ax.set_title(f"{name}: entropy {r['thought_entropy_bits']:.2f} bits of {math.log2(len(counts)):.2f}",
                     fontsize=8)
        ax.set_ylabel("uses", fontsize=7)
        integer_ticks(ax, range(len(counts)))  # token ids: no ticks at -0.5, 0.5
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel("thinking token <think_i>, i")
    if not used:
        axes[0].text(0.5, 0.5, "no arm samples thinking tokens", ha="center", va="center",
                     transform=axes[0].transAxes)
    fig.tight_layout()
    paths["vocabulary_usage"] = out / "vocabulary_usage.png"
    fig.savefig(paths["vocabulary_usage"], dpi=110)

    probed = {k: r["content"]["interventions"] for k, r in acc.items() if r.get("content", {}).get(
        "interventions")}
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for name, entries in probed.items():
        ax.errorbar([e["position"] for e in entries], [100 * e["changed"]["mean"] for e in entries],
                    yerr=[100 * e["changed"]["std"] for e in entries], fmt="o-", capsize=3, label=name)
    ax.set(xlabel="thought position k (0 = first thought)",
           ylabel="answers changed (%), mean ± std over seeds",
           title="replacing the k-th thought: how often the answer changes", ylim=(-3, 103))
    integer_ticks(ax, sorted({e["position"] for entries in probed.values() for e in entries}))
    if probed:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    else:
        ax.text(0.5, 0.5, "no arm has thoughts to replace", ha="center", va="center", transform=ax.transAxes)
    paths["interventions"] = out / "interventions.png"
    fig.savefig(paths["interventions"], dpi=110, bbox_inches="tight")
    return paths


def integer_ticks(ax, values) -> None:
    """x ticks on the integers plotted (every one when few), with room either side of a single value."""
    values = list(values)
    if len(values) <= 20:
        ax.set_xticks(values)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if values:
        ax.set_xlim(min(values) - 0.6, max(values) + 0.6)


def content_section(summary: dict) -> list[str]:
    """Markdown: per arm that thinks, what its thoughts carry."""
    md = []
    for name, r in summary.items():
        c = r.get("content")
        if not c:
            continue
        md += [f"### {name}", "",
               f"First {c['num_examples']} examples of the split. Greedy accuracy {fmt(r['accuracy'])}; "
               + ", ".join(f"{k} {fmt(v)}" for k, v in c["pass_at_k"].items()) + " (temperature 1).", ""]
        if c["interventions"]:
            md += ["| thought position | answers changed | accuracy drop (points) | examples per seed |",
                   "|---|---|---|---|"]
            md += [f"| {e['position']} | {fmt(e['changed'])} | {fmt(e['drop_points'], digits=1)} | "
                   f"{', '.join(map(str, e['n']))} |" for e in c["interventions"]]
            md.append("")
        elif r["thought_steps"]["mean"] == 0:
            md += ["No thoughts: pass@k and annotated rollouts only.", ""]
        else:
            md += ["No thought could be replaced (a single thinking token: there is no other).", ""]
        # a seed without thoughts has no pairs; one whose thoughts carry nothing (a constant pause) has
        # NMI 0 everywhere: its "best" pairs are noise, said as such
        tables = {seed: pairs for seed, pairs in c["code_pairs"].items() if pairs}
        for seed, pairs in tables.items():
            best = "; ".join(describe(p) for p in pairs) if any(p["nmi"] >= 0.005 for p in pairs) else \
                "NMI 0.00 at every position: the thoughts carry nothing about any step or the answer"
            md += [f"- code table, seed {seed}: {best}"]
        if tables:
            md.append("")
        if c["embedding"]:
            md += [f"Most used thinking tokens (seed {c['first_seed']}):", "",
                   "| token | uses | nearest text tokens | logit lens | moved from init |",
                   "|---|---|---|---|---|"]
            md += [f"| {e['token']} | {e['uses']} | {' · '.join(map(repr, e['nearest']))} | "
                   f"{' · '.join(map(repr, e['logit_lens']))} | {e['moved']:.3f} |" for e in c["embedding"]]
            md.append("")
    if md:
        md = ["## What the thoughts carry", "",
              "Interventions replace the k-th thought (another thinking token, or another example's vector) "
              "and re-decode: a thought nothing reads changes no answer. Code table: NMI between the thought "
              "at a position and a character of a step or the answer, beside its chance level. Annotated "
              "examples: rollouts.html.", ""] + md
    return md


def rollouts_page(summary: dict, title: str) -> str:
    """Each arm's annotated examples (first seed): prompt, thoughts with ids and nearest text tokens, answer,
    gold, right or wrong, exact-match reward."""
    import html as h

    parts = []
    for name, r in summary.items():
        c = r.get("content")
        if not c or not c["rollouts"]:
            continue
        rows = []
        for ex in c["rollouts"]:
            spans = []
            for s in ex["steps"]:
                text = h.escape(s["text"])
                if s["kind"] == "thought":
                    near = "|".join(t.strip() for t in s.get("nearest", []))
                    sub = f"<sub>≈{h.escape(near)}</sub>" if near else ""
                    text = f'<b class="thought">{text}</b>{sub}'
                spans.append(text)
            mark = "✓" if ex["correct"] else "✗"
            rows.append(f"<tr><td>{h.escape(ex['prompt'])}</td><td><pre>{''.join(spans)}</pre></td>"
                        f"<td>{h.escape(ex['answer'])}</td><td>{h.escape(ex['gold'])}</td><td>{mark}</td>"
                        f"<td>{ex['reward']:.0f}</td></tr>")
        head = ("<tr><th>prompt</th><th>generated (thoughts in bold, ≈ nearest text tokens of the row)</th>"
                "<th>answer</th><th>gold</th><th>right</th><th>reward (exact match)</th></tr>")
        heading = f"<h2>{h.escape(name)} (seed {c['first_seed']})</h2>"
        parts.append(f"{heading}<table>{head}{''.join(rows)}</table>")
    body = "".join(parts) or "<p>No arm has annotated rollouts.</p>"
    return html_page(f"{title} rollouts", f"<h1>{h.escape(title)}: annotated rollouts</h1>{body}",
                     ROLLOUT_STYLE)


def write_report(cfg, records: list[dict], failed: dict) -> dict:
    out = cfg.dir
    summary = summarise(records)
    statements = [p for a, b in cfg.comparisons for metric in PAIRED
                  if (p := paired(records, a, b, metric)) is not None]
    data = {"study": cfg.name, "split": cfg.split, "seeds": cfg.seeds, "arms": summary,
            "comparisons": statements,
            "failed": {f"{a} seed {s}": m for (a, s), m in failed.items()}, "records": records}
    (out / "study.json").write_text(json.dumps(data, indent=2))
    # a text study's arms, parallel ones included, are in its own section (analysis/text_report.py), with
    # its own figure: the accuracy figures would be empty
    text_study = any("text" in r for r in summary.values())
    general = {k: r for k, r in summary.items() if "accuracy" in r or ("nll_thought" in r and not text_study)}
    paths = {"placement": placement_figure(summary, out / "placement.png")} if text_study else \
        figures(summary, out)
    curves = learning_curves(out, list(summary), cfg.seeds, out / "learning_curves.png")
    if curves is not None:
        paths["learning_curves"] = curves
    md = [f"# Study `{cfg.name}`", "",
          f"Split `{cfg.split}`, seeds {cfg.seeds}; mean ± std over seeds; greedy decoding. Controls: no "
          f"thoughts, a fixed pause input at every thought step, another example's thoughts "
          f"(analysis/controls.py).", "",
          *([table(general), ""] if general else []),
          *text_section(summary)]
    if statements:
        md += ["## Comparisons", ""] + [f"- {s['text']}" for s in statements] + [""]
    if failed:
        md += ["## Failed", ""] + [f"- {a} seed {s}: {m}" for (a, s), m in failed.items()] + [""]
    md += content_section(summary)
    (out / "rollouts.html").write_text(rollouts_page(summary, cfg.name))
    if text_study:
        (out / "text_rollouts.html").write_text(text_rollouts_page(summary, cfg.name))
    md += ["## Figures", ""] + [f"![{k}]({p.name})" for k, p in paths.items()]
    (out / "report.md").write_text("\n".join(md) + "\n")
    html = "\n".join(md)
    for k, p in paths.items():  # inline: the HTML stands alone
        b64 = base64.b64encode(p.read_bytes()).decode()
        html = html.replace(f"![{k}]({p.name})", f'<img alt="{k}" src="data:image/png;base64,{b64}">')
    (out / "report.html").write_text(markdown_to_html(html, cfg.name))
    return data


def markdown_to_html(text: str, title: str) -> str:
    """The report's small markdown subset (headings, tables, bullets, images already inlined) as HTML."""
    import html as h

    body, in_table = [], False
    for line in text.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            body.append(("<table>" if not in_table else "") + "<tr>" +
                        "".join(f"<{tag}>{h.escape(c)}</{tag}>" for c in cells) + "</tr>")
            in_table = True
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{h.escape(line.lstrip('# '))}</h{level}>")
        elif line.startswith("- "):
            body.append(f"<li>{h.escape(line[2:])}</li>")
        elif line.startswith("<img"):
            body.append(f"<p>{line}</p>")
        elif line.strip():
            body.append(f"<p>{h.escape(line)}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}img{max-width:100%}")
    return html_page(title, "".join(body), style)
