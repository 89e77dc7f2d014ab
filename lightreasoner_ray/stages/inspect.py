"""``lightreasoner inspect``: ``<output_dir>/samples_report.html``, the samples made visible.

One self-contained static page (inline CSS, JS and SVG; nothing fetched): the KL
distribution over every sampled position with the chosen beta, the selection ratio,
and a browsable list of trajectories whose tokens are shaded by D_KL(expert ‖ amateur),
selected steps outlined. Clicking a token shows the expert's and the amateur's top
tokens there and, at a selected step, the contrastive soft label.

The samples store the KL at every position and the soft labels, not the models'
distributions; the top tokens are recomputed for the shown trajectories only, with one
teacher-forced forward pass of each model per trajectory (cheaper than storing top-k
for every sampled position, and the samples' format stays as it is).
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import math
from typing import Any, Sequence

import numpy as np

from lightreasoner_ray.config import Config
from lightreasoner_ray.errors import LightReasonerError
from lightreasoner_ray.io import storage
from lightreasoner_ray.io.layout import RunLayout
from lightreasoner_ray.ui.console import echo

logger = logging.getLogger(__name__)

# Trajectories shown (in problem-id order) and top tokens per model and position.
MAX_TRAJECTORIES = 40
TOP_K = 5
HISTOGRAM_BINS = 40


def run_inspect(config: Config, max_trajectories: int = MAX_TRAJECTORIES) -> dict[str, Any]:
    """Write the samples page for ``<output_dir>/samples``; return what it shows."""
    layout = RunLayout(config.output_dir)
    rows = read_samples(layout.samples)
    config = as_sampled(config)
    shown = rows[:max_trajectories]
    tokenizer, top = top_tokens_for(config, shown)
    page_data = build_page_data(config, rows, shown, tokenizer, top)
    path = layout.samples_report
    storage.write_bytes_atomic(path, render_html(page_data).encode("utf-8"))
    stats = page_data["stats"]
    echo(f"samples report: {path} ({len(shown)} of {len(rows)} trajectories shown, selection ratio "
         f"{stats['selection_ratio']:.3f} at beta {stats['beta']})")
    return {"path": path, **page_data}


def as_sampled(config: Config) -> Config:
    """The config with the models, alpha and beta the samples were made with (samples_summary.json),
    so that the page tells what the samples hold, and ``inspect output_dir=D`` needs no model paths."""
    path = RunLayout(config.output_dir).samples_summary
    if not storage.exists(path):
        if not config.expert.path or not config.amateur.path:
            raise LightReasonerError(f"{path} is missing: give expert.path and amateur.path")
        return config
    summary = storage.read_json(path)
    sampled = summary.get("config", {}).get("sampling", {})
    models = summary.get("models", {})
    return dataclasses.replace(
        config,
        expert=dataclasses.replace(config.expert, path=config.expert.path or models.get("expert", "")),
        amateur=dataclasses.replace(config.amateur, path=config.amateur.path or models.get("amateur", "")),
        sampling=dataclasses.replace(config.sampling, alpha=sampled.get("alpha", config.sampling.alpha),
                                     beta=sampled.get("beta", config.sampling.beta)),
    )


def read_samples(samples_dir: str) -> list[dict[str, Any]]:
    if not storage.exists(samples_dir) or not storage.list_parquet_files(samples_dir):
        raise LightReasonerError(
            f"no samples in {samples_dir}: run `lightreasoner sample` (or `run`) with this config first"
        )
    rows = storage.read_parquet(samples_dir).to_pylist()
    for index, row in enumerate(rows):
        if row.get("position_kl") is None or len(row["position_kl"]) != len(row["completion_ids"]):
            raise LightReasonerError(
                f"{samples_dir}: row {index} (problem {row.get('problem_id')!r}) has no position_kl of the "
                "completion's length; re-sample with this version to inspect it"
            )
    rows.sort(key=lambda row: str(row["problem_id"]))
    return rows


def top_tokens_for(config: Config, rows: Sequence[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
    """Per shown trajectory: the expert's and the amateur's top-k ids and probabilities at each position."""
    import torch

    from lightreasoner_ray.engines.models import default_device, load_model, load_tokenizer, shared_vocab_size

    device = default_device()
    tokenizer = load_tokenizer(config.expert, "expert")
    models = {"expert": load_model(config.expert, "expert", device), "amateur": load_model(config.amateur, "amateur", device)}
    vocab = shared_vocab_size(tokenizer, *models.values())
    top: list[dict[str, Any]] = []
    with torch.no_grad():
        for row in rows:
            prompt, completion = list(row["prompt_ids"]), list(row["completion_ids"])
            input_ids = torch.tensor([prompt + completion], device=device)
            per_model = {}
            for role, model in models.items():
                # Position t of the completion is predicted from prompt + completion[:t].
                logits = model(input_ids=input_ids).logits[0, len(prompt) - 1:len(prompt) + len(completion) - 1, :vocab]
                probs = torch.softmax(logits.float(), dim=-1)
                values, ids = probs.topk(min(TOP_K, vocab), dim=-1)
                per_model[role] = {"ids": ids.tolist(), "probs": values.tolist()}
            top.append(per_model)
    return tokenizer, top


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """How each token reads on its own (byte-level pieces decoded, not ``Ġ``-prefixed)."""
    return [tokenizer.decode([int(token)], skip_special_tokens=False, clean_up_tokenization_spaces=False) for token in ids]


def kl_histogram(values: np.ndarray, bins: int = HISTOGRAM_BINS) -> dict[str, list[float]]:
    if values.size == 0:
        return {"edges": [0.0, 1.0], "counts": [0]}
    upper = float(np.quantile(values, 0.995)) or float(values.max()) or 1.0
    counts, edges = np.histogram(np.clip(values, 0.0, upper), bins=bins, range=(0.0, upper))
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def build_page_data(config: Config, rows: Sequence[dict[str, Any]], shown: Sequence[dict[str, Any]], tokenizer: Any,
                    top: Sequence[dict[str, Any]]) -> dict[str, Any]:
    all_kl = np.concatenate([np.asarray(row["position_kl"], dtype=np.float64) for row in rows]) if rows else np.zeros(0)
    tokens = sum(len(row["completion_ids"]) for row in rows)
    selected = sum(len(row["steps"]) for row in rows)
    vocabulary_ids = set()
    for row, models in zip(shown, top):
        vocabulary_ids.update(row["completion_ids"])
        for model in models.values():
            for ids in model["ids"]:
                vocabulary_ids.update(ids)
        for ids in row["target_ids"]:
            vocabulary_ids.update(ids)
    ordered = sorted(vocabulary_ids)
    vocabulary = dict(zip((str(i) for i in ordered), token_texts(tokenizer, ordered)))
    trajectories = []
    for row, models in zip(shown, top):
        labels = {
            str(step): {"ids": list(ids), "probs": [round(float(p), 5) for p in probs]}
            for step, ids, probs in zip(row["steps"], row["target_ids"], row["target_probs"])
        }
        trajectories.append({
            "problem_id": str(row["problem_id"]),
            "prompt": tokenizer.decode(row["prompt_ids"], skip_special_tokens=False),
            "tokens": list(row["completion_ids"]),
            "kl": [round(float(k), 5) for k in row["position_kl"]],
            "steps": list(row["steps"]),
            "soft_labels": labels,
            "expert_top": {"ids": models["expert"]["ids"], "probs": _rounded(models["expert"]["probs"])},
            "amateur_top": {"ids": models["amateur"]["ids"], "probs": _rounded(models["amateur"]["probs"])},
        })
    quantiles = {f"p{q}": float(np.quantile(all_kl, q / 100)) for q in (1, 50, 90, 99)} if all_kl.size else {}
    return {
        "stats": {
            "output_dir": config.output_dir,
            "expert": config.expert.path,
            "amateur": config.amateur.path,
            "alpha": config.sampling.alpha,
            "beta": config.sampling.beta,
            "trajectories": len(rows),
            "completion_tokens": tokens,
            "selected_steps": selected,
            "selection_ratio": selected / tokens if tokens else 0.0,
            "kl_mean": float(all_kl.mean()) if all_kl.size else 0.0,
            "kl_quantiles": quantiles,
            "shown": len(trajectories),
        },
        "histogram": kl_histogram(all_kl),
        "vocabulary": vocabulary,
        "trajectories": trajectories,
    }


def _rounded(rows: list[list[float]]) -> list[list[float]]:
    return [[round(float(p), 5) for p in row] for row in rows]


def histogram_svg(histogram: dict[str, list[float]], beta: float, width: int = 640, height: int = 180) -> str:
    """Bars of the KL distribution with beta as a dashed line (plain inline SVG)."""
    edges, counts = histogram["edges"], histogram["counts"]
    top = max(counts) or 1
    span = (edges[-1] - edges[0]) or 1.0
    left, bottom, plot_w, plot_h = 40, 24, width - 50, height - 34
    bars = []
    for index, count in enumerate(counts):
        x = left + (edges[index] - edges[0]) / span * plot_w
        w = max(1.0, (edges[index + 1] - edges[index]) / span * plot_w - 1)
        h = count / top * plot_h
        colour = "#d9534f" if edges[index] >= beta else "#7a9cc6"
        bars.append(f'<rect x="{x:.1f}" y="{height - bottom - h:.1f}" width="{w:.1f}" height="{h:.1f}" fill="{colour}">'
                    f'<title>KL {edges[index]:.3f}–{edges[index + 1]:.3f}: {count} positions</title></rect>')
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             'aria-label="KL distribution">', *bars,
             f'<line x1="{left}" y1="{height - bottom}" x2="{left + plot_w}" y2="{height - bottom}" stroke="#444"/>']
    for fraction in (0.0, 0.25, 0.5, 0.75, 1.0):
        value = edges[0] + fraction * span
        parts.append(f'<text x="{left + fraction * plot_w:.1f}" y="{height - 6}" font-size="11" text-anchor="middle">'
                     f'{value:.2f}</text>')
    parts.append(f'<text x="4" y="14" font-size="11">{top}</text>')
    if edges[0] <= beta <= edges[-1]:
        x = left + (beta - edges[0]) / span * plot_w
        parts.append(f'<line x1="{x:.1f}" y1="8" x2="{x:.1f}" y2="{height - bottom}" stroke="#222" stroke-dasharray="4 3"/>'
                     f'<text x="{x + 4:.1f}" y="18" font-size="12">β = {beta:g}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _format(value: float) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def render_html(data: dict[str, Any]) -> str:
    stats = data["stats"]
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    quantiles = ", ".join(f"{name} {_format(value)}" for name, value in stats["kl_quantiles"].items())
    summary = (
        f"<b>{stats['trajectories']}</b> trajectories, <b>{stats['completion_tokens']}</b> completion tokens, "
        f"<b>{stats['selected_steps']}</b> selected steps: selection ratio <b>{stats['selection_ratio']:.3f}</b> "
        f"at β = {stats['beta']:g} (α = {stats['alpha']:g}). KL mean {_format(stats['kl_mean'])}; {quantiles}."
    )
    return PAGE.format(
        title=html.escape(f"LightReasoner samples: {stats['output_dir']}"),
        expert=html.escape(stats["expert"]),
        amateur=html.escape(stats["amateur"]),
        summary=summary,
        histogram=histogram_svg(data["histogram"], stats["beta"]),
        shown=stats["shown"],
        payload=payload,
    )


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 0; color: #222; }}
header {{ padding: 12px 20px; background: #f4f4f6; border-bottom: 1px solid #ddd; }}
h1 {{ font-size: 18px; margin: 0 0 4px; }}
main {{ display: grid; grid-template-columns: 260px 1fr 300px; height: calc(100vh - 250px); min-height: 400px; }}
#list {{ overflow-y: auto; border-right: 1px solid #ddd; }}
#list div {{ padding: 4px 10px; cursor: pointer; border-bottom: 1px solid #eee; font-size: 12px; }}
#list div.active {{ background: #e3ecf8; }}
#trajectory {{ overflow-y: auto; padding: 10px 16px; }}
#prompt {{ white-space: pre-wrap; color: #666; font-size: 12px; border-left: 3px solid #ccc; padding-left: 8px; }}
#tokens {{ font-family: ui-monospace, monospace; white-space: pre-wrap; margin-top: 10px; line-height: 1.9; }}
.tok {{ cursor: pointer; border-radius: 2px; }}
.tok.sel {{ outline: 2px solid #1f4e9c; outline-offset: -1px; }}
.tok.focus {{ box-shadow: 0 0 0 2px #124; }}
#detail {{ overflow-y: auto; border-left: 1px solid #ddd; padding: 10px; font-size: 12px; }}
table {{ border-collapse: collapse; width: 100%; margin-bottom: 10px; }}
td, th {{ border-bottom: 1px solid #eee; padding: 2px 4px; text-align: left; }}
td.p {{ text-align: right; font-variant-numeric: tabular-nums; }}
.bar {{ background: #7a9cc6; height: 8px; display: inline-block; }}
.legend span {{ padding: 0 6px; }}
code {{ background: #f0f0f0; padding: 0 3px; }}
</style></head>
<body>
<header>
<h1>LightReasoner samples</h1>
<div>Expert <code>{expert}</code>, amateur <code>{amateur}</code>.</div>
<div id="summary">{summary}</div>
<div>{histogram}</div>
<div class="legend">Token shading: D<sub>KL</sub>(expert ‖ amateur) at that position
from the 1st to the 99th percentile
(<span style="background:rgba(217,83,79,0.15)">low</span><span style="background:rgba(217,83,79,0.85)">high</span>);
<span class="tok sel">outlined</span> = selected step (KL &gt; β). Click a token for the top tokens. {shown} trajectories shown.</div>
</header>
<main><nav id="list"></nav><section id="trajectory"><div id="prompt"></div><div id="tokens"></div></section>
<aside id="detail">Click a token.</aside></main>
<script id="samples-data" type="application/json">{payload}</script>
<script>
const data = JSON.parse(document.getElementById("samples-data").textContent);
const vocab = data.vocabulary;
// Shade from the 1st to the 99th percentile of all sampled positions, so that small differences show.
const klLow = data.stats.kl_quantiles.p1 || 0;
const klSpan = Math.max((data.stats.kl_quantiles.p99 || 0) - klLow, 1e-6);
const shade = kl => Math.min(1, Math.max(0.04, (kl - klLow) / klSpan));
const text = id => (vocab[String(id)] ?? ("#" + id));
function esc(s) {{ return s.replace(/[&<>"]/g, c => ({{"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}})[c]); }}
function shown(s) {{ return esc(s).replace(/\\n/g, "⏎").replace(/ /g, "·"); }}
function table(title, ids, probs) {{
  let rows = ids.map((id, i) => `<tr><td><code>${{shown(text(id))}}</code></td><td class="p">${{probs[i].toFixed(3)}}</td>` +
    `<td><span class="bar" style="width:${{Math.round(probs[i] * 80)}}px"></span></td></tr>`).join("");
  return `<b>${{title}}</b><table>${{rows}}</table>`;
}}
function showToken(t, pos, span) {{
  document.querySelectorAll(".tok.focus").forEach(e => e.classList.remove("focus"));
  span.classList.add("focus");
  const label = t.soft_labels[String(pos)];
  let out = `<div>position <b>${{pos}}</b>, token <code>${{shown(text(t.tokens[pos]))}}</code>, KL <b>${{t.kl[pos].toFixed(3)}}</b>` +
    (label ? " — <b>selected</b>" : " — not selected") + `</div><br>`;
  out += table("expert top tokens", t.expert_top.ids[pos], t.expert_top.probs[pos]);
  out += table("amateur top tokens", t.amateur_top.ids[pos], t.amateur_top.probs[pos]);
  out += label ? table("soft label v_C (training target)", label.ids, label.probs) : "<i>no soft label: KL ≤ β</i>";
  document.getElementById("detail").innerHTML = out;
}}
function showTrajectory(index) {{
  const t = data.trajectories[index];
  document.querySelectorAll("#list div").forEach((e, i) => e.classList.toggle("active", i === index));
  document.getElementById("prompt").textContent = t.prompt;
  const box = document.getElementById("tokens");
  box.innerHTML = "";
  const selected = new Set(t.steps);
  t.tokens.forEach((id, pos) => {{
    const span = document.createElement("span");
    span.className = "tok" + (selected.has(pos) ? " sel" : "");
    span.textContent = text(id);
    span.title = `KL ${{t.kl[pos].toFixed(3)}}`;
    span.style.background = `rgba(217,83,79,${{shade(t.kl[pos]).toFixed(3)}})`;
    span.onclick = () => showToken(t, pos, span);
    span.onmouseenter = () => showToken(t, pos, span);
    box.appendChild(span);
  }});
}}
const list = document.getElementById("list");
data.trajectories.forEach((t, i) => {{
  const item = document.createElement("div");
  item.textContent = `${{t.problem_id}} · ${{t.steps.length}}/${{t.tokens.length}} selected`;
  item.onclick = () => showTrajectory(i);
  list.appendChild(item);
}});
if (data.trajectories.length) {{
  showTrajectory(0);
  const first = document.querySelector("#tokens .tok.sel") || document.querySelector("#tokens .tok");
  if (first) first.onclick();
}}
</script>
</body></html>
"""
