"""A study's report: `study.json` (every number), `report.md` and `report.html` (self-contained, figures
inline), and the figures as PNG files. Everything is computed from the arms' result.json records, nothing
written by hand:

  * the results table in the form of Coconut's: per arm, held-out accuracy mean +/- std over seeds, the
    controls (no thoughts, pause, shuffled thoughts) for every arm that thinks, text tokens and thought steps
    per answer, tokens processed per answer (prompt + text + thought steps: the compute axis), wall time;
  * one paired statement per comparison the study names: the mean per-seed difference and how many seeds
    agree with its sign;
  * figures: accuracy against tokens processed per answer (the main one), thinking-row movement beside the
    shuffled-thought gap (Adam moves any row with a gradient: movement alone says nothing), and the usage of
    the thinking vocabulary in the arms' answers.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: files only, no display or global state

from .controls import CONTROLS


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0)


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
            row["real_tokens"] = stat([e["real_tokens_mean"] for e in evs])
            row["tokens_per_answer"] = stat([e["prompt_tokens_mean"] + e["real_tokens_mean"]
                                             + e["thought_steps_mean"] for e in evs])
            if all("controls" in e for e in evs):
                row["controls"] = {c: stat([e["controls"][c]["accuracy"] for e in evs]) for c in CONTROLS}
            usage = [e.get("thought_usage") for e in evs]
            if all(u for u in usage):
                total = [sum(col) for col in zip(*usage)]
                row["thought_usage"] = total
                row["thought_entropy_bits"] = entropy_bits(total)
        else:  # parallel-thought arms: held-out NLL with and without their thoughts
            row["nll_thought"] = stat([e["nll_thought"] for e in evs])
            row["nll_base"] = stat([e["nll_base"] for e in evs])
        moved = [r["movement"]["mean"] for r in rs if r.get("movement") and r["movement"].get("num_rows")]
        if len(moved) == len(rs):
            row["row_movement"] = stat(moved)
        out[name] = row
    return out


def entropy_bits(counts: list[int]) -> float:
    n = sum(counts)
    return -sum(c / n * math.log2(c / n) for c in counts if c) if n else 0.0


def paired(records: list[dict], a: str, b: str) -> dict | None:
    """a vs b over the seeds both finished: mean difference in accuracy points and how many seeds agree."""
    acc = {(r["arm"], r["seed"]): r["eval"].get("accuracy") for r in records}
    seeds = sorted(s for (arm, s) in acc if arm == a and (b, s) in acc and acc[a, s] is not None
                   and acc[b, s] is not None)
    if not seeds:
        return None
    diffs = [100 * (acc[a, s] - acc[b, s]) for s in seeds]
    mean = sum(diffs) / len(diffs)
    agree = sum((d > 0) == (mean > 0) and d != 0 for d in diffs) if mean else sum(d == 0 for d in diffs)
    return {"a": a, "b": b, "mean_points": mean, "per_seed": diffs, "agree": agree, "seeds": len(seeds),
            "text": f"{a} vs {b}: {mean:+.1f} points, seeds agree {agree}/{len(seeds)}"}


def fmt(stat: dict | None, scale: float = 1.0, digits: int = 3) -> str:
    if stat is None:
        return "-"
    return f"{stat['mean'] * scale:.{digits}f} ± {stat['std'] * scale:.{digits}f}"


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
                     f"{fmt(r.get('real_tokens'), digits=2)} | {fmt(r.get('tokens_per_answer'), digits=1)} | "
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
    if acc:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    paths["accuracy_vs_compute"] = out / "accuracy_vs_compute.png"
    fig.savefig(paths["accuracy_vs_compute"], dpi=110)

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

    used = {k: r for k, r in acc.items() if r.get("thought_usage")}
    fig = Figure(figsize=(7, 1.2 + 1.6 * max(len(used), 1)))
    axes = fig.subplots(max(len(used), 1), 1, squeeze=False)[:, 0]
    for ax, (name, r) in zip(axes, used.items()):
        counts = r["thought_usage"]
        ax.bar(range(len(counts)), counts, color="#c2185b")
        ax.set_title(f"{name}: entropy {r['thought_entropy_bits']:.2f} bits of {math.log2(len(counts)):.2f}",
                     fontsize=8)
        ax.set_ylabel("uses", fontsize=7)
    axes[-1].set_xlabel("thinking token <think_i>, i")
    if not used:
        axes[0].text(0.5, 0.5, "no arm samples thinking tokens", ha="center", va="center",
                     transform=axes[0].transAxes)
    fig.tight_layout()
    paths["vocabulary_usage"] = out / "vocabulary_usage.png"
    fig.savefig(paths["vocabulary_usage"], dpi=110)
    return paths


def write_report(cfg, records: list[dict], failed: dict) -> dict:
    out = cfg.dir
    summary = summarise(records)
    statements = [p for a, b in cfg.comparisons if (p := paired(records, a, b)) is not None]
    data = {"study": cfg.name, "split": cfg.split, "seeds": cfg.seeds, "arms": summary,
            "comparisons": statements,
            "failed": {f"{a} seed {s}": m for (a, s), m in failed.items()}, "records": records}
    (out / "study.json").write_text(json.dumps(data, indent=2))
    paths = figures(summary, out)
    md = [f"# Study `{cfg.name}`", "",
          f"Split `{cfg.split}`, seeds {cfg.seeds}; mean ± std over seeds; greedy decoding. Controls: no "
          f"thoughts, a fixed pause input at every thought step, another example's thoughts "
          f"(analysis/controls.py).", "",
          table(summary), ""]
    if statements:
        md += ["## Comparisons", ""] + [f"- {s['text']}" for s in statements] + [""]
    if failed:
        md += ["## Failed", ""] + [f"- {a} seed {s}: {m}" for (a, s), m in failed.items()] + [""]
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
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{h.escape(title)}</title>" \
           f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
